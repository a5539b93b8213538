"""View-conditioned prompts for Perp-Neg: interpolated positive embedding + negative view prompts with weights.

Two public schedules. Weights here follow ``perp_neg_guidance``: >= 0 and *subtracted* (the reference codes
store them negated and add them).

- "threestudio": shifted exponential f(a, b, c; r) = a exp(-b r) + c with f_fs = f_sf = (4, 0.5, -2.426),
  f_sb = (1, 0.5, -0.606), f_fsb = (1, 0.5, 0.967); overhead view (elevation > 60 deg) uses no negatives.
- "dreamfusion" (stable-dreamfusion): negative_w = -2, front decay 2, side decay 10.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

VIEWS = ("front", "side", "back", "overhead")
F_FS = (4.0, 0.5, -2.426)
F_SF = (4.0, 0.5, -2.426)
F_SB = (1.0, 0.5, -0.606)
F_FSB = (1.0, 0.5, 0.967)
VIEW_AZIMUTH = {"front": 0.0, "side": 90.0, "back": 180.0}


def shifted_exponential_decay(a: float, b: float, c: float, r: float | Tensor) -> float | Tensor:
    """f(a, b, c; r) = a * exp(-b * r) + c."""
    if isinstance(r, Tensor):
        return a * torch.exp(-b * r) + c
    return a * math.exp(-b * r) + c


def view_prompts(prompt: str) -> dict[str, str]:
    """The view-dependent prompts: '<prompt>, front view' etc."""
    return {v: f"{prompt}, {v} view" for v in VIEWS}


def shift_azimuth(azimuth_deg: float) -> float:
    """Azimuth in degrees mapped to [-180, 180)."""
    return (float(azimuth_deg) + 180.0) % 360.0 - 180.0


@dataclass
class ViewWeights:
    """Positive = sum_v pos[v] * emb[v]; negatives: the embeddings of views ``neg_views`` with weights ``neg_w`` (>= 0)."""

    pos: dict[str, float]
    neg_views: tuple[str, str]
    neg_w: tuple[float, float]


def threestudio_weights(elevation_deg: float, azimuth_deg: float, overhead_threshold: float = 60.0) -> ViewWeights:
    """threestudio's perp-neg schedule for one camera (front-side / side-back interpolation, overhead)."""
    if elevation_deg > overhead_threshold:
        return ViewWeights({"overhead": 1.0}, ("front", "side"), (0.0, 0.0))
    azi = abs(shift_azimuth(azimuth_deg))
    if azi < 90:
        r = 1.0 - azi / 90.0  # 1 = front, 0 = side
        return ViewWeights(
            {"front": r, "side": 1.0 - r},
            ("front", "side"),
            (shifted_exponential_decay(*F_FS, r), shifted_exponential_decay(*F_SF, 1.0 - r)),
        )
    r = 2.0 - azi / 90.0  # 1 = side, 0 = back
    return ViewWeights(
        {"side": r, "back": 1.0 - r},
        ("side", "front"),
        (shifted_exponential_decay(*F_SB, r), shifted_exponential_decay(*F_FSB, r)),
    )


def dreamfusion_weights(
    azimuth_deg: float, negative_w: float = -2.0, front_decay: float = 2.0, side_decay: float = 10.0
) -> ViewWeights:
    """stable-dreamfusion's perp-neg schedule for one camera (weights returned as -their value, i.e. >= 0)."""
    azi = shift_azimuth(azimuth_deg)
    if -90 <= azi < 90:
        r = 1.0 - abs(azi) / 90.0  # 1 = front, 0 = side
        front_w = 0.0 if r > 0.8 else math.exp(-r * front_decay) * negative_w
        side_w = 0.0 if r < 0.2 else math.exp(-(1.0 - r) * side_decay) * negative_w
        return ViewWeights({"front": r, "side": 1.0 - r}, ("front", "side"), (-front_w, -side_w))
    r = 1.0 - (azi - 90.0) / 90.0 if azi >= 0 else 1.0 + (azi + 90.0) / 90.0  # 1 = side, 0 = back
    side_w = 0.0 if r > 0.8 else math.exp(-r * side_decay) * negative_w / 2.0
    return ViewWeights({"side": r, "back": 1.0 - r}, ("side", "front"), (-side_w, -negative_w))


def view_weights(elevation_deg: float, azimuth_deg: float, schedule: str = "threestudio", **kw) -> ViewWeights:
    """Dispatch to a schedule by name ('threestudio' or 'dreamfusion')."""
    if schedule == "threestudio":
        return threestudio_weights(elevation_deg, azimuth_deg, **kw)
    if schedule in ("dreamfusion", "stable-dreamfusion"):
        return dreamfusion_weights(azimuth_deg, **kw)
    raise ValueError(f"unknown view schedule '{schedule}' (use 'threestudio' or 'dreamfusion')")


def view_conditioned_embeddings(
    view_embeds: dict[str, Tensor], elevation: Tensor | list[float], azimuth: Tensor | list[float],
    schedule: str = "threestudio", **kw,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per camera: positive embedding [B, L, D], negative embeddings [2, B, L, D], negative weights [2, B] (>= 0).

    ``view_embeds`` maps 'front' / 'side' / 'back' (and 'overhead' for threestudio) to [L, D] or [1, L, D].
    """
    emb = {k: (v[0] if v.ndim == 3 else v) for k, v in view_embeds.items()}
    elev = [float(e) for e in torch.as_tensor(elevation).flatten()]
    azim = [float(a) for a in torch.as_tensor(azimuth).flatten()]
    pos, negs, ws = [], [], []
    for e, a in zip(elev, azim, strict=True):
        vw = view_weights(e, a, schedule, **kw)
        pos.append(sum(c * emb[v] for v, c in vw.pos.items()))  # interpolated positive, e.g. r*front + (1-r)*side
        negs.append(torch.stack([emb[v] for v in vw.neg_views]))
        ws.append(torch.tensor(vw.neg_w, dtype=torch.float32))
    ref = next(iter(emb.values()))
    return torch.stack(pos), torch.stack(negs, dim=1), torch.stack(ws, dim=1).to(ref.device)


@torch.no_grad()
def encode_view_prompts(pipe, prompt: str, uncond: str = "") -> dict[str, Tensor]:
    """Encode the four view prompts and the unconditional text with a diffusers pipeline's text encoder ([1, L, D])."""
    device = pipe._execution_device
    out = {}
    for v, text in {**view_prompts(prompt), "uncond": uncond}.items():
        out[v] = pipe.encode_prompt(text, device, 1, False)[0]
    return out
