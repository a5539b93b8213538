"""Run a trained SegDecNet on images: defect probability per image, full-resolution masks and heatmaps."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vision.io import list_images, open_image_or_skip, output_names, write_bytes_atomic, write_json_atomic

from .evaluate import _upsample
from .spec import load_segdec


def _default_threshold(weights: Path) -> float:
    start = weights if weights.is_dir() else weights.parent
    for p in [start, *start.parents][:4]:
        f = p / "eval" / "metrics.json"
        if f.is_file():
            try:
                return float(json.loads(f.read_text())["threshold"])
            except (KeyError, ValueError, TypeError):
                break
    return 0.5


def write_defect_prediction(out: Path, image: Path, stem: str, orig: np.ndarray, full: np.ndarray, prob: float,
                            thr: float, seg_threshold: float, heatmaps: bool) -> dict[str, Any]:
    """One image's ``predict`` outputs: ``OUT/masks/STEM.png`` (full-resolution segmentation >= ``seg_threshold``)
    and, with ``heatmaps``, ``OUT/heatmaps/STEM.jpg``; returns its record. Shared by the PyTorch and onnxruntime
    paths."""
    from vision.viz import overlay_heatmap, save_image

    mask = full >= seg_threshold
    mpath = out / "masks" / f"{stem}.png"
    buf_png = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buf_png, format="PNG")
    write_bytes_atomic(mpath, buf_png.getvalue())
    rec = {"image": str(image), "probability": round(prob, 6), "defective": bool(prob >= thr),
           "defect_pixels": int(mask.sum()), "width": int(orig.shape[1]), "height": int(orig.shape[0]),
           "mask": str(mpath)}
    if heatmaps:
        hpath = out / "heatmaps" / f"{stem}.jpg"
        save_image(overlay_heatmap(orig, np.clip(full, 0, 1)), hpath)
        rec["heatmap"] = str(hpath)
    return rec


def write_prediction_summary(out: Path, results: list[dict[str, Any]], thr: float, seg_threshold: float,
                             skipped: list[str]) -> None:
    """``OUT/predictions.csv`` and ``OUT/predictions.json`` of a ``defect predict`` run."""
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(["image", "probability", "defective", "defect_pixels", "mask"])
    for r in results:
        wr.writerow([r["image"], f"{r['probability']:.6f}", int(r["defective"]), r["defect_pixels"], r["mask"]])
    write_bytes_atomic(out / "predictions.csv", buf.getvalue().encode())
    write_json_atomic(out / "predictions.json", {"threshold": thr, "seg_threshold": seg_threshold,
                                                 "skipped": skipped, "predictions": results})


@torch.no_grad()
def predict_segdec(
    weights: str | Path,
    source: str | Path,
    out: str | Path,
    *,
    threshold: float | None = None,
    seg_threshold: float = 0.5,
    batch: int = 4,
    device: str | None = None,
    heatmaps: bool = True,
    skip_bad: bool = False,
) -> list[dict[str, Any]]:
    """Run a trained SegDecNet on images. Per image: defect probability (predictions.csv / .json), the
    full-resolution mask PNG (segmentation >= ``seg_threshold``) and a heatmap overlay. ``threshold``
    (default: the run's best-F1 threshold from its evaluation, else 0.5) decides "defective"."""
    model, spec = load_segdec(weights, device)
    dev = next(model.parameters()).device
    thr = _default_threshold(Path(weights)) if threshold is None else float(threshold)
    h, w = spec["img_size"]
    grey = int(spec.get("channels", spec["model"].get("in_channels", 1))) == 1
    out = Path(out)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    if heatmaps:
        (out / "heatmaps").mkdir(parents=True, exist_ok=True)
    files = list_images(source)
    names = dict(zip(files, output_names(files, source), strict=True))
    results: list[dict[str, Any]] = []
    skipped: list[str] = []
    for i in range(0, len(files), batch):
        chunk, originals, tensors = [], [], []
        for f in files[i:i + batch]:
            im = open_image_or_skip(f, "L" if grey else "RGB", skip_bad, skipped)  # EXIF orientation applied
            if im is None:
                continue
            orig = np.asarray(im)
            small = np.asarray(im.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
            chunk.append(f)
            originals.append(orig)
            tensors.append(torch.from_numpy(small[None] if grey else small.transpose(2, 0, 1).copy()))
        if not chunk:
            continue
        dec, seg = model(torch.stack(tensors).to(dev))
        probs = torch.sigmoid(dec.float()).cpu().numpy()
        seg_p = torch.sigmoid(seg.float())[:, 0].cpu().numpy()
        for f, orig, prob, sp in zip(chunk, originals, probs, seg_p, strict=True):
            full = _upsample(sp, orig.shape[:2])
            stem = names[f].as_posix()
            results.append(write_defect_prediction(out, f, stem, orig, full, float(prob), thr, seg_threshold,
                                                   heatmaps))
    write_prediction_summary(out, results, thr, seg_threshold, skipped)
    return results
