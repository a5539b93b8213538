"""A DAGM-style surface-defect sample set: textured grey images, most defect-free, some with synthetic defects.

Three defect families (``family=``, listed in ``FAMILIES``):

- ``marks`` (default): real textures (scikit-image's bundled brick, grass and gravel photos) or procedural ones
  (multi-scale noise, woven fabric, brushed metal, wood grain) with a visible mark: a scratch, spot, crack or
  stain (``DEFECT_TYPES``).
- ``local_texture``: stochastic textures (``STOCHASTIC_TEXTURES``: procedural fabric, brushed metal, wood grain,
  multi-scale noise; the grass and gravel photos) with a soft-edged blob or band (10-30 % of the image side)
  where the texture's orientation, scale (frequency), contrast or grain differs (``LOCAL_TEXTURE_DEFECTS``)
  while the local mean brightness is kept: no mark, only changed texture statistics.
- ``global_texture``: the same textures with the whole image's statistics shifted slightly (orientation a few
  degrees, frequency or contrast 10-30 %, added grain; ``GLOBAL_TEXTURE_DEFECTS``), the mean kept; the mask of a
  defective image is the whole image.

Every defective image has a pixel mask; the defect sub-kind goes to labels.csv's ``defect`` column and the family
to info.json. The texture families are tuned so that logistic regression on six global texture statistics is
informative but far from perfect (held-out AUROC about 0.8 at 128 px); ``LOCAL_TEXTURE_PARAMS`` and
``GLOBAL_TEXTURE_PARAMS`` hold their sizes. A share of the defective training images is marked image-level only
(mixed supervision). Everything is generated offline and is deterministic for a seed; sample i does not depend on
the set size.

Layout written (the generic folder layout of ``negvision defect``)::

    OUT/train/images/train_0000.png   OUT/train/masks/train_0000.png (defective images only)
    OUT/train/labels.csv              image,label,segmented,texture,defect
    OUT/test/...                      OUT/info.json (family, sizes, counts)
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from vision.io import write_bytes_atomic, write_text_atomic

__all__ = ["DEFECT_TYPES", "FAMILIES", "FAMILY_DEFECTS", "FAMILY_TEXTURES", "GLOBAL_TEXTURE_DEFECTS",
           "GLOBAL_TEXTURE_PARAMS", "LOCAL_TEXTURE_DEFECTS", "LOCAL_TEXTURE_PARAMS", "RENDERERS",
           "STOCHASTIC_TEXTURES", "TEXTURES", "make_defects", "render_defect_sample", "render_global_texture_sample",
           "render_local_texture_sample"]

REAL_TEXTURES = ("brick", "grass", "gravel")
PROCEDURAL_TEXTURES = ("noise", "fabric", "brushed", "wood")
TEXTURES = REAL_TEXTURES + PROCEDURAL_TEXTURES
DEFECT_TYPES = ("scratch", "spot", "crack", "stain")
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


# ----------------------------------------------------------------------------------------------- textures


@cache
def _real_texture(name: str) -> np.ndarray:
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    if img.ndim == 3:
        img = img[..., :3].mean(axis=2)
    return img.astype(np.float32) / 255.0


def _smooth_noise(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """Gaussian noise low-passed at ``scale`` pixels, zero mean, unit std."""
    from scipy.ndimage import gaussian_filter

    n = rng.standard_normal((size, size)).astype(np.float32)
    a = gaussian_filter(n, sigma=max(0.5, scale), mode="wrap")
    return (a - a.mean()) / (a.std() + 1e-6)


def _resize(a: np.ndarray, w: int, h: int) -> np.ndarray:
    return np.asarray(Image.fromarray(a.astype(np.float32)).resize((w, h), Image.Resampling.BILINEAR))


def _texture(rng: np.random.Generator, name: str, size: int) -> np.ndarray:
    """A [size, size] float texture in [0, 1]."""
    if name in REAL_TEXTURES:
        src = _real_texture(name)
        side = int(min(src.shape) * rng.uniform(0.3, 1.0))
        y, x = (int(rng.integers(0, s - side + 1)) for s in src.shape)
        crop = _resize(src[y : y + side, x : x + side], size, size)
        crop = np.rot90(crop, int(rng.integers(4)))
        return np.clip(crop if rng.random() < 0.5 else crop[:, ::-1], 0, 1)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if name == "noise":
        t = sum(_smooth_noise(rng, size, size * s) * w for s, w in ((0.01, 0.5), (0.04, 0.35), (0.12, 0.25)))
        return np.clip(0.5 + 0.12 * t, 0, 1)
    if name == "fabric":
        period = rng.uniform(6, 14) * size / 128
        ang = rng.uniform(0, math.pi)
        u = (np.cos(ang) * xx + np.sin(ang) * yy) * size / period * 2 * math.pi
        v = (-np.sin(ang) * xx + np.cos(ang) * yy) * size / period * 2 * math.pi
        weave = np.sin(u) * np.sign(np.sin(v / 2)) + np.sin(v) * np.sign(np.cos(u / 2))
        t = 0.5 + 0.1 * weave + 0.04 * _smooth_noise(rng, size, 1.0)
        return np.clip(t, 0, 1)
    if name == "brushed":
        n = rng.standard_normal((size, size)).astype(np.float32)
        k = max(3, size // 6)
        n = np.cumsum(n, axis=1)
        n = n - np.concatenate([np.zeros((size, k), np.float32), n[:, :-k]], axis=1)  # running mean along rows
        n = (n - n.mean()) / (n.std() + 1e-6)
        t = 0.5 + 0.08 * n + 0.05 * _smooth_noise(rng, size, size * 0.1)
        if rng.random() < 0.5:
            t = t.T
        return np.clip(t, 0, 1)
    # wood: rings around an off-image centre, distorted by smooth noise
    cx, cy = rng.uniform(-1.0, 2.0, size=2)
    r = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) * rng.uniform(15, 30)
    r = r + 0.8 * _smooth_noise(rng, size, size * 0.08)
    t = 0.5 + 0.12 * np.sin(2 * math.pi * r) + 0.03 * _smooth_noise(rng, size, 1.0)
    return np.clip(t, 0, 1)


# ----------------------------------------------------------------------------------------------- defects


def _canvas(size: int, ss: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("L", (size * ss, size * ss), 0)
    return img, ImageDraw.Draw(img)


def _finish(img: Image.Image, size: int, blur: float = 0.0) -> np.ndarray:
    if blur > 0:
        img = img.filter(ImageFilter.GaussianBlur(radius=blur))
    return np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0


def _defect_alpha(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """Opacity map [size, size] in [0, 1] of one defect (the mask is alpha > 0.5)."""
    ss = 4  # supersampling for smooth edges
    S = size * ss
    img, draw = _canvas(size, ss)
    margin = 0.12 * S
    cx, cy = rng.uniform(margin, S - margin, size=2)
    if kind == "scratch":
        length = rng.uniform(0.25, 0.6) * S
        ang = rng.uniform(0, math.pi)
        dx, dy = math.cos(ang) * length / 2, math.sin(ang) * length / 2
        bend = rng.normal(0, 0.15) * length
        pts = []
        for t in np.linspace(0, 1, 40):  # quadratic Bezier with a bent middle
            mx, my = cx - math.sin(ang) * bend, cy + math.cos(ang) * bend
            x = (1 - t) ** 2 * (cx - dx) + 2 * (1 - t) * t * mx + t**2 * (cx + dx)
            y = (1 - t) ** 2 * (cy - dy) + 2 * (1 - t) * t * my + t**2 * (cy + dy)
            pts.append((x, y))
        width = max(ss * 1.5, rng.uniform(0.012, 0.025) * S)
        draw.line(pts, fill=255, width=int(round(width)), joint="curve")
        return _finish(img, size)
    if kind == "spot":
        rx, ry = rng.uniform(0.03, 0.08, size=2) * S
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
        return _finish(img, size, blur=ss)
    if kind == "crack":
        width = int(round(max(ss * 1.5, 0.012 * S)))
        stack = [(cx, cy, rng.uniform(0, 2 * math.pi), 0)]
        step = 0.02 * S
        n_segments = 0
        while stack and n_segments < 6:
            x, y, ang, depth = stack.pop()
            pts = [(x, y)]
            for _ in range(int(rng.integers(8, 18))):
                ang += rng.normal(0, 0.35)
                x = float(np.clip(x + math.cos(ang) * step, 0, S - 1))
                y = float(np.clip(y + math.sin(ang) * step, 0, S - 1))
                pts.append((x, y))
                if depth < 2 and rng.random() < 0.08:
                    stack.append((x, y, ang + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2), depth + 1))
            draw.line(pts, fill=255, width=max(ss, width - depth * ss), joint="curve")
            n_segments += 1
        return _finish(img, size)
    # stain: a soft irregular blob (union of a few ellipses), low contrast
    r0 = rng.uniform(0.06, 0.14) * S
    for _ in range(int(rng.integers(3, 6))):
        ox, oy = rng.normal(0, 0.5 * r0, size=2)
        rx, ry = rng.uniform(0.5, 1.0, size=2) * r0
        draw.ellipse([cx + ox - rx, cy + oy - ry, cx + ox + rx, cy + oy + ry], fill=255)
    return _finish(img, size, blur=0.25 * r0)


def render_defect_sample(
    rng: np.random.Generator, size: int, defective: bool, texture: str | None = None, defect: str | None = None
) -> tuple[np.ndarray, np.ndarray, str, str]:
    """(uint8 image [size, size], bool mask, texture name, defect name or "") of one sample."""
    texture = texture or TEXTURES[int(rng.integers(len(TEXTURES)))]
    base = _texture(rng, texture, size)
    if not defective:
        return (np.clip(base, 0, 1) * 255 + 0.5).astype(np.uint8), np.zeros((size, size), bool), texture, ""
    defect = defect or DEFECT_TYPES[int(rng.integers(len(DEFECT_TYPES)))]
    for _ in range(20):
        alpha = _defect_alpha(rng, defect, size)
        mask = alpha > 0.5
        if mask.sum() >= 4:
            break
    local_std = float(base.std()) + 0.03
    contrast = {"scratch": 2.5, "spot": 2.2, "crack": 2.8, "stain": 1.4}[defect] * local_std
    sign = -1.0 if defect == "crack" or rng.random() < 0.5 else 1.0
    if defect == "stain":  # stains shift the local mean and flatten the texture a little
        img = base * (1 - 0.4 * alpha) + alpha * 0.4 * base.mean() + sign * contrast * alpha
    else:
        img = base + sign * contrast * alpha
    img = np.clip(img, 0, 1)
    return (img * 255 + 0.5).astype(np.uint8), mask, texture, defect


# ----------------------------------------------------------------------------------------------- texture families
# A stochastic texture sample is ``mean + sigma0 * z`` with ``z = c * S(A x) + g * n``: S a canonical source field
# (procedural, or a real photo) sampled through the 2x2 map A (orientation, scale) and normalised to zero mean and
# unit std, c its contrast, n a fine unit-std grain field with weight g. A texture defect changes one of A, c, g.


@dataclass(frozen=True)
class _Stochastic:
    """Nominal look of one stochastic texture (the "product"): orientation in degrees, isotropic or not."""

    angle: float
    isotropic: bool
    freq: float = 1.0  # source pixels per output pixel (procedural) or its factor (photos): > 1 is finer
    blur: float = 0.0  # source low-pass, output pixels
    sigma0: float = 0.07  # grey-level std of the structure
    grain0: float = 0.12  # fine-grain weight g, in units of the structure std


# freq and blur are calibrated so that every texture has about the same gradient and Laplacian energy per unit
# std (at 128 px): the global statistics of a sample then tell its defect, not its texture.
_STOCHASTIC = {
    "fabric": _Stochastic(angle=0.0, isotropic=False, freq=0.55),
    "brushed": _Stochastic(angle=0.0, isotropic=False, freq=0.45, blur=0.5),
    "wood": _Stochastic(angle=90.0, isotropic=False, freq=0.45),
    "noise": _Stochastic(angle=0.0, isotropic=True, freq=0.65),
    "grass": _Stochastic(angle=0.0, isotropic=True, freq=0.7, blur=1.25),
    "gravel": _Stochastic(angle=0.0, isotropic=True, freq=0.75, blur=1.0),
}
STOCHASTIC_TEXTURES = tuple(_STOCHASTIC)
TEXTURE_DEFECT_TYPES = ("orientation", "scale", "contrast", "grain")
LOCAL_TEXTURE_DEFECTS = TEXTURE_DEFECT_TYPES
GLOBAL_TEXTURE_DEFECTS = TEXTURE_DEFECT_TYPES
FAMILIES = ("marks", "local_texture", "global_texture")
FAMILY_TEXTURES = {"marks": TEXTURES, "local_texture": STOCHASTIC_TEXTURES, "global_texture": STOCHASTIC_TEXTURES}
FAMILY_DEFECTS = {"marks": DEFECT_TYPES, "local_texture": LOCAL_TEXTURE_DEFECTS,
                  "global_texture": GLOBAL_TEXTURE_DEFECTS}

# Natural variation of every sample (defective or not) around the texture's nominal look.
_JITTER = {"angle": 1.5, "scale": 0.03, "contrast": 0.04, "grain": 0.1, "mean": (0.42, 0.58)}
# local_texture: how far the region's statistic moves (factor ranges; either direction unless noted).
LOCAL_TEXTURE_PARAMS = {
    "region_side": (0.10, 0.30),  # blob diameter or band width, share of the image side
    "edge": 0.025,  # soft-edge width, share of the image side
    "rotation_deg": (45.0, 90.0),  # oriented textures: the region's orientation turns by this much
    "stretch": (1.6, 2.2),  # isotropic textures: the region is stretched along one direction (and squeezed across)
    "scale": (1.6, 2.4),  # frequency factor (finer) or its inverse (coarser)
    "contrast": (1.8, 2.6),  # contrast factor (stronger) or its inverse (weaker)
    "grain": (0.4, 0.8),  # grain weight added; the total std is kept
    "finer_share": 0.9,  # share of scale changes that make the texture finer (the rest: coarser)
    "stronger_share": 0.9,  # share of contrast changes that make it stronger (the rest: weaker)
}
# global_texture: the whole image's statistic moves slightly.
GLOBAL_TEXTURE_PARAMS = {
    "rotation_deg": (3.0, 8.0),
    "stretch": (1.06, 1.15),
    "scale": (1.10, 1.25),  # frequency factor (finer) or its inverse (coarser)
    "contrast": (1.15, 1.30),  # contrast factor (stronger) or its inverse (weaker)
    "grain": (0.1, 0.25),  # grain weight added; the total std is kept
    "finer_share": 0.9,
    "stronger_share": 0.9,
}


def _unit(a: np.ndarray) -> np.ndarray:
    a = a - a.mean()
    return (a / (a.std() + 1e-8)).astype(np.float32)


def _gauss(a: np.ndarray, sigma: float | tuple[float, float]) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(a, sigma=sigma, mode="wrap")


def _stochastic_source(rng: np.random.Generator, name: str, size: int) -> tuple[np.ndarray, float, np.ndarray]:
    """(canonical source field, source pixels per output pixel, centre in the source as (x, y))."""
    spec = _STOCHASTIC[name]
    if name in REAL_TEXTURES:
        src = _real_texture(name)
        zoom = 0.3 * min(src.shape) / size * spec.freq  # the image shows about 30 % of the photo's side
        r = 0.75 * size * zoom
        cx, cy = (rng.uniform(r, s - r) for s in (src.shape[1], src.shape[0]))
        if spec.blur > 0:
            src = _gauss(src, spec.blur * zoom)
        return src, zoom, np.array([cx, cy])
    side = int(math.ceil(1.9 * size * spec.freq)) + 8
    u = size / 128  # feature sizes are set for 128 px images
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    if name == "noise":  # multi-scale isotropic noise, fine scales dominant
        t = sum(w * _unit(_gauss(rng.standard_normal((side, side)).astype(np.float32), s * u))
                for s, w in ((1.0, 0.5), (2.5, 0.4), (6.0, 0.3)))
    elif name == "fabric":  # plain weave with wavy threads, uneven thread brightness and slubs
        p = 9.0 * u
        U = xx / p + 0.12 * _unit(_gauss(rng.standard_normal((side, side)).astype(np.float32), 5 * p))
        V = yy / p + 0.12 * _unit(_gauss(rng.standard_normal((side, side)).astype(np.float32), 5 * p))
        n_threads = int(side / p) + 4
        warp_b, weft_b = rng.normal(0, 0.3, size=(2, n_threads))
        warp = (np.sin(2 * np.pi * U) + warp_b[np.floor(U).astype(int) % n_threads]) * np.tanh(3 * np.sin(np.pi * V))
        weft = (np.sin(2 * np.pi * V) + weft_b[np.floor(V).astype(int) % n_threads]) * np.tanh(3 * np.cos(np.pi * U))
        t = warp + weft + 0.3 * _unit(_gauss(rng.standard_normal((side, side)).astype(np.float32), 1.5 * u))
        t = _unit(t) + 0.35 * _unit(_gauss(rng.standard_normal((side, side)).astype(np.float32), 0.6 * u))  # fibres
    elif name == "brushed":  # streaks along x
        t = _unit(_gauss(rng.standard_normal((side, side)).astype(np.float32), (0.6 * u, 12 * u)))
        t = t + 0.35 * _unit(_gauss(rng.standard_normal((side, side)).astype(np.float32), 6 * u))
    else:  # wood: warped grain lines along x (early/late wood profile) with fibres
        p = 7.0 * u
        phase = yy / p + 0.8 * _unit(_gauss(rng.standard_normal((side, side)).astype(np.float32), 20 * u))
        t = ((np.sin(2 * np.pi * phase) + 1) / 2) ** 2
        t = _unit(t) + 0.5 * _unit(_gauss(rng.standard_normal((side, side)).astype(np.float32), (0.5 * u, 4 * u)))
    if spec.blur > 0:
        t = _gauss(t, spec.blur * spec.freq)
    c = (side - 1) / 2 + rng.uniform(-0.5, 0.5, size=2)
    return t.astype(np.float32), spec.freq, c


def _rot(deg: float) -> np.ndarray:
    a = math.radians(deg)
    return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])


@dataclass
class _Scene:
    """One stochastic texture sample before its defect: the source and its nominal parameters."""

    coeffs: np.ndarray  # spline coefficients of the source field
    centre: np.ndarray  # source point (x, y) at the image centre
    A: np.ndarray  # output -> source map (orientation, scale)
    contrast: float
    grain: float
    grain_field: np.ndarray
    mean: float
    sigma0: float
    isotropic: bool


def _scene(rng: np.random.Generator, texture: str, size: int) -> _Scene:
    from scipy.ndimage import spline_filter

    spec = _STOCHASTIC[texture]
    src, zoom, centre = _stochastic_source(rng, texture, size)
    angle = spec.angle + rng.uniform(-1, 1) * _JITTER["angle"]
    scale = zoom * (1 + rng.uniform(-1, 1) * _JITTER["scale"])
    contrast = 1 + rng.uniform(-1, 1) * _JITTER["contrast"]
    grain = spec.grain0 * (1 + rng.uniform(-1, 1) * _JITTER["grain"])
    mean = rng.uniform(*_JITTER["mean"])
    grain_field = _unit(_gauss(rng.standard_normal((size, size)).astype(np.float32), 0.5))
    return _Scene(spline_filter(src, order=3, mode="mirror"), centre, scale * _rot(angle), contrast, grain,
                  grain_field, mean, spec.sigma0, spec.isotropic)


def _render_z(sc: _Scene, M: np.ndarray | None = None, p0: np.ndarray | None = None,
              contrast: float | None = None, grain: float | None = None) -> np.ndarray:
    """z = c * S + g * n, the source sampled at ``centre + A (p0 - o) + A M (p - p0)`` (o the image centre)."""
    from scipy.ndimage import map_coordinates

    size = sc.grain_field.shape[0]
    o = (size - 1) / 2
    p0 = np.array([o, o]) if p0 is None else p0
    M = np.eye(2) if M is None else M
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    d = np.stack([xs - p0[0], ys - p0[1]])
    q = np.tensordot(sc.A @ M, d, axes=1) + (sc.centre + sc.A @ (p0 - o))[:, None, None]
    S = _unit(map_coordinates(sc.coeffs, [q[1], q[0]], order=3, mode="mirror", prefilter=False))
    c = sc.contrast if contrast is None else contrast
    g = sc.grain if grain is None else grain
    return c * S + g * sc.grain_field


def _texture_change(rng: np.random.Generator, sc: _Scene, kind: str, params: dict) -> dict:
    """Keyword arguments of ``_render_z`` that apply a ``kind`` change of the given size to the scene."""
    u = rng.random()  # the direction of the change
    if kind == "orientation":
        if sc.isotropic:  # an isotropic texture has no orientation to turn: it gets one, stretched along phi
            k, phi = rng.uniform(*params["stretch"]), rng.uniform(0, 180)
            return {"M": _rot(phi) @ np.diag([k, 1 / k]) @ _rot(-phi)}
        return {"M": _rot((1 if u < 0.5 else -1) * rng.uniform(*params["rotation_deg"]))}
    if kind == "scale":  # source pixels per output pixel times f: a finer texture for f > 1
        f = rng.uniform(*params["scale"]) ** (1 if u < params["finer_share"] else -1)
        return {"M": np.eye(2) * f}
    if kind == "contrast":
        f = rng.uniform(*params["contrast"]) ** (1 if u < params["stronger_share"] else -1)
        return {"contrast": sc.contrast * f}
    # grain: more fine grain, the structure weakened so that the total std stays
    g = sc.grain + rng.uniform(*params["grain"])
    total = sc.contrast**2 + sc.grain**2
    return {"grain": g, "contrast": math.sqrt(max(total - g * g, 0.05 * total))}


def _region_alpha(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(soft opacity [size, size] of a blob or a band, its reference point (x, y)); the mask is alpha > 0.5."""
    ext = rng.uniform(*LOCAL_TEXTURE_PARAMS["region_side"]) * size
    edge = max(1.0, LOCAL_TEXTURE_PARAMS["edge"] * size)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    phi = rng.uniform(0, math.pi)
    n = np.array([math.cos(phi), math.sin(phi)])
    if rng.random() < 0.5:  # blob: an irregular ellipse
        r = ext / 2
        p0 = rng.uniform(r + edge, size - r - edge, size=2) if size > 2 * (r + edge) else np.full(2, (size - 1) / 2)
        aspect = rng.uniform(0.6, 1.0)
        u = ((xs - p0[0]) * n[0] + (ys - p0[1]) * n[1]) / r
        v = (-(xs - p0[0]) * n[1] + (ys - p0[1]) * n[0]) / (r * aspect)
        ang = np.arctan2(v, u)
        wobble = 1 + sum(rng.uniform(0, 0.12) * np.cos(k * ang + rng.uniform(0, 2 * math.pi)) for k in (2, 3))
        dist = (np.hypot(u, v) - wobble) * r * aspect
    else:  # band across the image
        p0 = (size - 1) / 2 + rng.uniform(-0.3, 0.3) * size * n
        dist = np.abs((xs - p0[0]) * n[0] + (ys - p0[1]) * n[1]) - ext / 2
    t = np.clip(0.5 - dist / edge, 0, 1)
    return (t * t * (3 - 2 * t)).astype(np.float32), p0


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def render_local_texture_sample(
    rng: np.random.Generator, size: int, defective: bool, texture: str | None = None, defect: str | None = None
) -> tuple[np.ndarray, np.ndarray, str, str]:
    """(uint8 image, bool mask, texture, defect or "") of one ``local_texture`` sample.

    A defect is a soft blob or band where orientation, scale, contrast or grain differs; its local mean is kept.
    The non-defective image drawn from the same generator state is the defective one outside the region.
    """
    from scipy.ndimage import gaussian_filter

    texture = texture or STOCHASTIC_TEXTURES[int(rng.integers(len(STOCHASTIC_TEXTURES)))]
    sc = _scene(rng, texture, size)
    z = _render_z(sc)
    if not defective:
        return _to_uint8(sc.mean + sc.sigma0 * (z - z.mean())), np.zeros((size, size), bool), texture, ""
    defect = defect or LOCAL_TEXTURE_DEFECTS[int(rng.integers(len(LOCAL_TEXTURE_DEFECTS)))]
    for _ in range(20):
        alpha, p0 = _region_alpha(rng, size)
        mask = alpha > 0.5
        if mask.sum() >= 4:
            break
    z_alt = _render_z(sc, p0=p0, **_texture_change(rng, sc, defect, LOCAL_TEXTURE_PARAMS))
    sigma = max(1.0, 0.04 * size)  # keep the local mean: the changed texture's low-pass replaced by the base's
    z_alt = z_alt - gaussian_filter(z_alt, sigma, mode="reflect") + gaussian_filter(z, sigma, mode="reflect")
    z_alt = z_alt - float((alpha * (z_alt - z)).sum() / alpha.sum())  # and the region's mean exactly
    img = sc.mean + sc.sigma0 * (z * (1 - alpha) + z_alt * alpha - z.mean())
    return _to_uint8(img), mask, texture, defect


def render_global_texture_sample(
    rng: np.random.Generator, size: int, defective: bool, texture: str | None = None, defect: str | None = None
) -> tuple[np.ndarray, np.ndarray, str, str]:
    """(uint8 image, bool mask, texture, defect or "") of one ``global_texture`` sample.

    A defective image has its whole texture's orientation, scale, contrast or grain shifted slightly, its mean
    kept; the mask is the whole image.
    """
    texture = texture or STOCHASTIC_TEXTURES[int(rng.integers(len(STOCHASTIC_TEXTURES)))]
    sc = _scene(rng, texture, size)
    if not defective:
        z = _render_z(sc)
        return _to_uint8(sc.mean + sc.sigma0 * (z - z.mean())), np.zeros((size, size), bool), texture, ""
    defect = defect or GLOBAL_TEXTURE_DEFECTS[int(rng.integers(len(GLOBAL_TEXTURE_DEFECTS)))]
    z = _render_z(sc, **_texture_change(rng, sc, defect, GLOBAL_TEXTURE_PARAMS))
    return _to_uint8(sc.mean + sc.sigma0 * (z - z.mean())), np.ones((size, size), bool), texture, defect


RENDERERS = {"marks": render_defect_sample, "local_texture": render_local_texture_sample,
             "global_texture": render_global_texture_sample}


# ----------------------------------------------------------------------------------------------- writing


def _write_png(arr: np.ndarray, path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())


def _write_text(path: Path, text: str) -> None:
    write_text_atomic(path, text)


def make_defects(
    out_dir: str | os.PathLike[str],
    n_train: int = 200,
    n_test: int = 100,
    img_size: int = 128,
    seed: int = 0,
    defect_fraction: float = 0.3,
    image_level_fraction: float = 0.3,
    textures: Sequence[str] | None = None,
    defects: Sequence[str] | None = None,
    family: str = "marks",
) -> Path:
    """Write a DAGM-style defect data set (train + test) to ``out_dir``; returns ``out_dir``.

    Args:
        out_dir: output folder (created; existing files of the same names are replaced).
        n_train: number of training images.
        n_test: number of test images.
        img_size: side of the square grey images in pixels (a multiple of 8, at least 32).
        seed: random seed; the same seed gives the same images.
        defect_fraction: share of images with a defect (0..1).
        image_level_fraction: share of defective training images marked image-level only
            (``segmented=0`` in labels.csv; their masks are still written, for evaluation).
        textures: texture names to draw from (default: all of the family's textures, ``FAMILY_TEXTURES``);
            one texture and one defect type give a single DAGM-like class.
        defects: defect types to draw from (default: all of the family's types, ``FAMILY_DEFECTS``).
        family: ``"marks"`` (visible scratches, spots, cracks, stains), ``"local_texture"`` (a region whose
            texture statistics differ, mean kept) or ``"global_texture"`` (the whole image's texture statistics
            shifted slightly; full-image masks). See ``FAMILIES``.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown defect family {family!r}; choose from {', '.join(FAMILIES)}")
    if n_train < 0 or n_test < 0:
        raise ValueError(f"n_train and n_test must be >= 0, got {n_train}, {n_test}")
    if img_size < 32 or img_size % 8:
        raise ValueError(f"img_size must be a multiple of 8 and >= 32, got {img_size}")
    if not 0.0 <= defect_fraction <= 1.0:
        raise ValueError(f"defect_fraction must be in [0, 1], got {defect_fraction}")
    if not 0.0 <= image_level_fraction <= 1.0:
        raise ValueError(f"image_level_fraction must be in [0, 1], got {image_level_fraction}")
    all_tex, all_dts = FAMILY_TEXTURES[family], FAMILY_DEFECTS[family]
    tex = tuple(textures) if textures else all_tex
    dts = tuple(defects) if defects else all_dts
    for name, allowed, what in ((tex, all_tex, "texture"), (dts, all_dts, "defect type")):
        bad = [t for t in name if t not in allowed]
        if bad:
            raise ValueError(f"unknown {what}(s) {bad} for family {family!r}; choose from {', '.join(allowed)}")
    render = RENDERERS[family]
    out = Path(out_dir)
    info: dict = {"family": family, "img_size": img_size, "seed": seed, "defect_fraction": defect_fraction,
                  "image_level_fraction": image_level_fraction, "textures": list(tex), "defects": list(dts),
                  "splits": {}}
    if family != "marks":
        params = LOCAL_TEXTURE_PARAMS if family == "local_texture" else GLOBAL_TEXTURE_PARAMS
        info["family_params"] = {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}
    for stream, (split, n) in enumerate((("train", n_train), ("test", n_test))):
        img_dir, mask_dir = out / split / "images", out / split / "masks"
        img_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        rows = []
        n_pos = n_weak = 0
        for i in range(n):
            # low-discrepancy choice of the defective images: every prefix has about the right share
            defective = ((i * _GOLDEN) % 1.0) < defect_fraction
            rng = np.random.default_rng([seed, stream, i])
            texture = tex[int(rng.integers(len(tex)))]
            defect = dts[int(rng.integers(len(dts)))]
            img, mask, texture, defect = render(rng, img_size, defective, texture, defect)
            name = f"{split}_{i:04d}.png"
            _write_png(img, img_dir / name)
            segmented = 1
            if defective:
                _write_png(mask.astype(np.uint8) * 255, mask_dir / name)
                n_pos += 1
                if split == "train" and ((i * _GOLDEN * 7.0) % 1.0) < image_level_fraction:
                    segmented = 0
                    n_weak += 1
            else:
                (mask_dir / name).unlink(missing_ok=True)
            rows.append([name, int(defective), segmented, texture, defect])
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["image", "label", "segmented", "texture", "defect"])
        w.writerows(rows)
        _write_text(out / split / "labels.csv", buf.getvalue())
        info["splits"][split] = {"images": n, "defective": n_pos, "image_level_only": n_weak}
    _write_text(out / "info.json", json.dumps(info, indent=2) + "\n")
    return out
