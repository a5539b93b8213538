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

from .evaluate import upsample_map
from .spec import load_segdec


def run_threshold(weights: Path, spec: dict[str, Any] | None = None) -> float | None:
    """The run's decision threshold: chosen on its validation images (``segdec.json``), else (runs from before
    validation existed) the best-F1 threshold of its final evaluation (``eval/metrics.json``); None without either."""
    if spec is not None and isinstance(spec.get("threshold"), (int, float)):
        return float(spec["threshold"])
    start = weights if weights.is_dir() else weights.parent
    for p in [start, *start.parents][:4]:
        f = p / "eval" / "metrics.json"
        if f.is_file():
            try:
                return float(json.loads(f.read_text())["threshold"])
            except (KeyError, ValueError, TypeError, OSError):
                return None
    return None


def default_threshold(weights: Path, spec: dict[str, Any] | None = None) -> float:
    thr = run_threshold(weights, spec)
    return 0.5 if thr is None else thr


HEATMAP_KINDS = ("auto", "segmentation", "cam")


def heatmap_kind(spec: dict[str, Any], wanted: str = "auto") -> str:
    """'segmentation' (the segmentation head's map) or 'cam' (Grad-CAM of the decision): auto picks the CAM when
    no pixel mask trained the segmentation head (labels-only training)."""
    if wanted not in HEATMAP_KINDS:
        raise ValueError(f"heatmap kind '{wanted}' is not one of {', '.join(HEATMAP_KINDS)}")
    if wanted != "auto":
        return wanted
    train = spec.get("train", {})
    return "cam" if train.get("supervision") == "weak" or train.get("defective_with_masks") == 0 else "segmentation"


def write_defect_prediction(out: Path, image: Path, stem: str, orig: np.ndarray, full: np.ndarray, prob: float,
                            thr: float, seg_threshold: float, heatmaps: bool, heat: np.ndarray | None = None,
                            kind: str = "segmentation") -> dict[str, Any]:
    """One image's ``predict`` outputs: ``OUT/masks/STEM.png`` (full-resolution segmentation >= ``seg_threshold``)
    and, with ``heatmaps``, ``OUT/heatmaps/STEM.jpg`` of ``heat`` (default: the segmentation map) whose ``kind``
    the record names; returns its record. Shared by the PyTorch and onnxruntime paths."""
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
        save_image(overlay_heatmap(orig, np.clip(full if heat is None else heat, 0, 1)), hpath)
        rec["heatmap"] = str(hpath)
        rec["heatmap_kind"] = kind
    return rec


def write_prediction_summary(out: Path, results: list[dict[str, Any]], thr: float, seg_threshold: float,
                             skipped: list[str], heatmap: str | None = None) -> None:
    """``OUT/predictions.csv`` and ``OUT/predictions.json`` of a ``defect predict`` run."""
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(["image", "probability", "defective", "defect_pixels", "mask"])
    for r in results:
        wr.writerow([r["image"], f"{r['probability']:.6f}", int(r["defective"]), r["defect_pixels"], r["mask"]])
    write_bytes_atomic(out / "predictions.csv", buf.getvalue().encode())
    desc = {"segmentation": "the segmentation head's defect probability",
            "cam": "Grad-CAM of the decision (no pixel mask trained the segmentation head)"}
    write_json_atomic(out / "predictions.json", {"threshold": thr, "seg_threshold": seg_threshold,
                                                 "heatmap": heatmap, "heatmap_meaning": desc.get(heatmap or ""),
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
    heatmap: str = "auto",
) -> list[dict[str, Any]]:
    """Run a trained SegDecNet on images. Per image: defect probability (predictions.csv / .json), the
    full-resolution mask PNG (segmentation >= ``seg_threshold``) and a heatmap overlay. ``threshold``
    (default: the run's best-F1 threshold on its validation images, else 0.5) decides "defective". ``heatmap``:
    'segmentation', 'cam' (Grad-CAM of the decision) or 'auto' (the CAM for labels-only runs, whose
    segmentation head no mask trained); each record and predictions.json say which kind was written."""
    model, spec = load_segdec(weights, device)
    kind = heatmap_kind(spec, heatmap)
    dev = next(model.parameters()).device
    thr = default_threshold(Path(weights), spec) if threshold is None else float(threshold)
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
        x = torch.stack(tensors).to(dev)
        dec, seg = model(x)
        cams = model.decision_cam(x)[1][:, 0].float().cpu().numpy() if heatmaps and kind == "cam" else None
        probs = torch.sigmoid(dec.float()).cpu().numpy()
        seg_p = torch.sigmoid(seg.float())[:, 0].cpu().numpy()
        for j, (f, orig, prob, sp) in enumerate(zip(chunk, originals, probs, seg_p, strict=True)):
            full = upsample_map(sp, orig.shape[:2])
            heat = upsample_map(cams[j], orig.shape[:2]) if cams is not None else None
            stem = names[f].as_posix()
            results.append(write_defect_prediction(out, f, stem, orig, full, float(prob), thr, seg_threshold,
                                                   heatmaps, heat, kind))
    write_prediction_summary(out, results, thr, seg_threshold, skipped, kind if heatmaps else None)
    return results
