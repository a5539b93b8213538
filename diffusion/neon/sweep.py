"""Neon sweep: for each w (and guidance scale), merge, sample, score; CSV table, FID-vs-w plot, best w."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vision.io import write_text_atomic

from .files import selftrained_source
from .merge import CheckpointMismatchError, check_w, neon_merge
from .metrics import (
    compute_features,
    fid_from_features,
    load_feature_extractor,
    load_image_folder,
    precision_recall,
)
from .selftrain import load_pipeline, sample_images, trainable_component

__all__ = ["SweepConfig", "neon_sweep", "parse_floats"]

CSV_FIELDS = ("w", "guidance_scale", "fid", "precision", "recall", "num_samples", "grid")


def parse_floats(text: str | Sequence[float], what: str = "w") -> list[float]:
    """'0,0.5,1' -> [0.0, 0.5, 1.0]; a clear error for anything that is not a finite number."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for item in items:
        if isinstance(item, str) and not item.strip():
            continue
        try:
            v = float(item)
        except ValueError as e:
            raise ValueError(f"bad {what} value {item!r} (expected comma-separated numbers, e.g. 0,0.5,1)") from e
        if not math.isfinite(v):
            raise ValueError(f"bad {what} value {item!r}: must be finite")
        out.append(v)
    if not out:
        raise ValueError(f"no {what} values given")
    return out


def _state_dict(module: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in module.state_dict().items()}


@dataclass
class SweepConfig:
    """The settings of a Neon sweep (how each merged model is sampled and scored).

    Attributes:
        features: a spec for :func:`load_feature_extractor` (``inception:PATH``, ``pixels[:N]``, ...) or a callable
            mapping images [N, C, H, W] in [0, 1] to features [N, D].
        num_samples: images sampled per w (and per guidance scale).
        batch_size: images per sampling call and per feature batch.
        num_inference_steps: sampler (denoising) steps per sample; None: the pipeline's default.
        guidance_scales: guidance scales to sweep too; None: the pipeline's default only.
        prompts: text-to-image pipelines: the prompts, cycled over the samples.
        class_labels: class-conditional pipelines: the labels, cycled; None: every class in turn.
        seed: the sampling seed, the same for every w (common random numbers).
        component: the pipeline component merged; None: ``unet`` or ``transformer``.
        k: k of the k-NN precision / recall.
        max_reference: use at most this many reference images of a folder.
        height, width, max_sequence_length: passed to the pipeline when given (SD3, Flux); the reference images are
            resized to the samples' size.
    """

    features: Any = "pixels"
    num_samples: int = 1000
    batch_size: int = 64
    num_inference_steps: int | None = None
    guidance_scales: Sequence[float] | None = None
    prompts: Sequence[str] | None = None
    class_labels: Sequence[int] | None = None
    seed: int = 0
    component: str | None = None
    k: int = 3
    max_reference: int | None = None
    height: int | None = None
    width: int | None = None
    max_sequence_length: int | None = None


def neon_sweep(
    base: str | os.PathLike,
    selftrained: str | os.PathLike,
    ws: Sequence[float],
    out_dir: str | os.PathLike,
    *,
    reference: str | os.PathLike | Tensor,
    config: SweepConfig | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score Neon-merged models over ``ws``; writes ``sweep.csv``, ``fid_vs_w.png``, sample grids, ``sweep.json``.

    ``reference`` is a folder of real images (or a tensor [N, C, H, W] in [0, 1]), resized to the samples' size;
    ``config`` the sampling and scoring settings (:class:`SweepConfig`; None: its defaults); ``device`` "cpu",
    "cuda", "cuda:N", "mps" or None (the best available). Every w uses the same sampling seed (common random numbers).
    """
    from vision.device import pick_device
    from vision.viz import image_grid, plot_metric_curve, save_image

    cfg = config if config is not None else SweepConfig()
    features, batch_size, component = cfg.features, cfg.batch_size, cfg.component
    height, width, max_reference = cfg.height, cfg.width, cfg.max_reference
    ws = [check_w(w) for w in ws]
    if not ws:
        raise ValueError("no w values to sweep")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = pick_device(device)
    pipe = load_pipeline(base, dev)
    name, denoiser = trainable_component(pipe, component)
    theta_base = _state_dict(denoiser)
    src = selftrained_source(Path(selftrained), name)
    theta_self = {key: src.get(key) for key in theta_base if key in src}
    if not theta_self:
        raise CheckpointMismatchError(
            f"the self-trained checkpoint '{selftrained}' shares no weights with the base '{name}' of '{base}'"
        )
    neon_merge(theta_base, theta_self, 1.0)  # fail on shape mismatches before any sampling

    extractor = load_feature_extractor(features)
    if isinstance(reference, Tensor):
        ref_images = reference
    else:
        den_cfg = denoiser.config
        size = getattr(den_cfg, "sample_size", None)
        hw = (size, size) if isinstance(size, int) else (tuple(size) if size else None)
        if getattr(pipe, "vae", None) is not None and hw is not None:
            hw = tuple(s * 2 ** (len(pipe.vae.config.block_out_channels) - 1) for s in hw)
        default, factor = getattr(pipe, "default_sample_size", None), getattr(pipe, "vae_scale_factor", None)
        if hw is None and isinstance(default, int) and isinstance(factor, int):
            hw = (default * factor, default * factor)  # a denoiser without sample_size (Flux): the pipeline's default
        if height is not None or width is not None:
            hw = (height or (hw[0] if hw else width), width or (hw[1] if hw else height))
        channels = int(getattr(den_cfg, "out_channels", 3)) if getattr(pipe, "vae", None) is None else 3
        ref_images = load_image_folder(reference, size=hw, channels=channels, limit=max_reference)
    ref_feats = compute_features(extractor, ref_images, batch_size=batch_size, device=dev)

    gss: list[float | None] = list(cfg.guidance_scales) if cfg.guidance_scales else [None]
    rows: list[dict[str, Any]] = []
    csv_path = out / "sweep.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for gs in gss:
            for w in ws:
                # theta_neon = (1 + w) * theta_base - w * theta_selftrained
                denoiser.load_state_dict(neon_merge(theta_base, theta_self, w))
                images, _ = sample_images(
                    pipe, cfg.num_samples, batch_size=batch_size, num_inference_steps=cfg.num_inference_steps,
                    seed=cfg.seed, prompts=cfg.prompts, class_labels=cfg.class_labels, guidance_scale=gs,
                    progress=progress, height=height, width=width, max_sequence_length=cfg.max_sequence_length,
                )
                feats = compute_features(extractor, images, batch_size=batch_size, device=dev)
                fid = fid_from_features(ref_feats, feats)
                try:
                    prec, rec = precision_recall(ref_feats, feats, k=cfg.k)
                except ValueError:
                    prec = rec = float("nan")
                tag = f"w{w:g}" + (f"_gs{gs:g}" if gs is not None else "")
                grid = save_image(image_grid(list(images[:64])), out / "samples" / f"{tag}.png")
                row = {"w": w, "guidance_scale": "" if gs is None else gs, "fid": fid, "precision": prec,
                       "recall": rec, "num_samples": len(images), "grid": str(grid.relative_to(out))}
                rows.append(row)
                writer.writerow({k_: (f"{v:.6g}" if isinstance(v, float) else v) for k_, v in row.items()})
                f.flush()
    denoiser.load_state_dict(theta_base)

    plots = []
    for gs in gss:
        sel = [r for r in rows if (r["guidance_scale"] == "" if gs is None else r["guidance_scale"] == gs)]
        suffix = "" if gs is None else f"_gs{gs:g}"
        plots.append(str(plot_metric_curve(
            [r["w"] for r in sel], [r["fid"] for r in sel], out / f"fid_vs_w{suffix}.png",
            xlabel="w (Neon extrapolation weight)", ylabel="FID",
            title="Neon: FID vs w" + (f" (guidance {gs:g})" if gs is not None else ""),
        )))
    best = min(rows, key=lambda r: r["fid"])
    base_rows = [r for r in rows if r["w"] == 0.0]
    summary = {
        "best_w": best["w"],
        "best_guidance_scale": best["guidance_scale"] if best["guidance_scale"] != "" else None,
        "best_fid": best["fid"],
        "base_fid": min(r["fid"] for r in base_rows) if base_rows else None,
        "rows": rows,
        "csv": str(csv_path),
        "plots": plots,
        "features": features if isinstance(features, str) else type(features).__name__,
        "num_reference": len(ref_feats),
    }
    write_text_atomic(out / "sweep.json", json.dumps(summary, indent=2))
    return summary
