"""Evaluate a SegDecNet on a defect data set: image-level and pixel-level metrics, results.csv, PR / ROC curves
and a heatmap grid."""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from vision.io import write_bytes_atomic, write_json_atomic

from .data import DefectDataset
from .metrics import dice_iou, image_metrics


@torch.no_grad()
def run_inference(
    model: nn.Module, dataset: DefectDataset, batch: int = 8, device: torch.device | None = None,
    num_workers: int = 0, progress: bool = False,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Defect probabilities [N] and segmentation probabilities (1/8 resolution, float32) of every image."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=num_workers)
    it: Any = loader
    if progress:
        from vision.progress import track

        it = track(loader, desc="eval", unit="batch")
    scores: list[float] = []
    segs: list[np.ndarray] = []
    try:
        for b in it:
            dec, seg = model(b["image"].to(device))
            scores.extend(torch.sigmoid(dec.float()).cpu().tolist())
            segs.extend(torch.sigmoid(seg.float())[:, 0].cpu().numpy())
    finally:
        model.train(was_training)
    return np.asarray(scores, dtype=np.float64), segs


def upsample_map(prob: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A probability map [h, w] resized bilinearly to ``shape`` (height, width), as float32."""
    t = torch.from_numpy(np.ascontiguousarray(prob, dtype=np.float32))[None, None]
    return F.interpolate(t, size=shape, mode="bilinear", align_corners=False)[0, 0].numpy()


def evaluate_segdec(
    model: nn.Module,
    dataset: DefectDataset,
    *,
    batch: int = 8,
    device: torch.device | None = None,
    seg_threshold: float = 0.5,
    pixel: bool = True,
    num_workers: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Image-level metrics (:func:`image_metrics`) and, with ``pixel``, Dice / IoU of the segmentation upsampled to
    each image's full resolution and thresholded at ``seg_threshold`` (mean over defective images with masks;
    ``dice_all`` / ``iou_all`` over every image with known ground truth). Adds ``per_image`` rows."""
    t0 = time.perf_counter()
    scores, segs = run_inference(model, dataset, batch, device, num_workers, progress)
    dt = time.perf_counter() - t0
    labels = np.asarray(dataset.labels)
    res = image_metrics(labels, scores)
    res["images_per_s"] = len(dataset) / max(dt, 1e-9)
    rows = []
    dice_pos, iou_pos, dice_all, iou_all = [], [], [], []
    for i, s in enumerate(dataset.samples):
        row: dict[str, Any] = {"name": s.name, "image": str(s.image), "label": int(s.label),
                               "score": float(scores[i]), "decision": int(scores[i] >= res["threshold"]),
                               "dice": "", "iou": ""}
        if pixel:
            gt = dataset.full_mask(i)
            if gt is not None:
                pred = upsample_map(segs[i], gt.shape) >= seg_threshold
                d, j = dice_iou(pred, gt)
                row["dice"], row["iou"] = round(d, 6), round(j, 6)
                dice_all.append(d)
                iou_all.append(j)
                if s.label == 1:
                    dice_pos.append(d)
                    iou_pos.append(j)
        rows.append(row)
    if pixel:
        nan = float("nan")
        res.update(
            dice=float(np.mean(dice_pos)) if dice_pos else nan,
            iou=float(np.mean(iou_pos)) if iou_pos else nan,
            dice_all=float(np.mean(dice_all)) if dice_all else nan,
            iou_all=float(np.mean(iou_all)) if iou_all else nan,
            seg_threshold=seg_threshold,
        )
    res["per_image"] = rows
    res["_segs"] = segs
    return res


def interp_pr(precision: Sequence[float], recall: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Precision interpolated (max to the right) on 101 recall points, for plotting."""
    p, r = np.asarray(precision), np.asarray(recall)
    grid = np.linspace(0, 1, 101)
    out = np.array([p[r >= g].max() if (r >= g).any() else 0.0 for g in grid])
    return grid, out


def save_eval_outputs(res: dict[str, Any], dataset: DefectDataset, out: str | Path, max_images: int = 16) -> dict[str, str]:
    """Write results.csv (per image), metrics.json, pr_curve.png, roc_curve.png and a grid of heatmaps."""
    from vision.viz import image_grid, overlay_heatmap, plot_pr_curves, plot_roc_curve, save_image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    buf = io.StringIO()
    fields = ["name", "image", "label", "score", "decision", "dice", "iou"]
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in res["per_image"]:
        w.writerow({k: (f"{r[k]:.6f}" if k == "score" else r[k]) for k in fields})
    write_bytes_atomic(out / "results.csv", buf.getvalue().encode())
    files["results"] = str(out / "results.csv")
    metrics = {k: v for k, v in res.items() if k not in ("per_image", "_segs", "pr_curve", "roc_curve")}
    write_json_atomic(out / "metrics.json", metrics)
    files["metrics"] = str(out / "metrics.json")
    if "pr_curve" in res:
        r, p = interp_pr(res["pr_curve"]["precision"], res["pr_curve"]["recall"])
        files["pr_curve"] = str(plot_pr_curves({"SegDecNet, 101-point interpolated": (r, p)}, out / "pr_curve.png",
                                               title=f"Precision-recall (AP {res['AP']:.4f})"))
    if "roc_curve" in res:
        files["roc_curve"] = str(plot_roc_curve(res["roc_curve"]["fpr"], res["roc_curve"]["tpr"], out / "roc_curve.png",
                                                auroc=res["AUROC"]))
    # pictures: mistakes first, then defective images, then the rest
    segs = res.get("_segs")
    if segs is not None and max_images > 0:
        rows = res["per_image"]
        order = sorted(range(len(rows)), key=lambda i: (rows[i]["decision"] == rows[i]["label"],
                                                         rows[i]["label"] == 0, -rows[i]["score"]))
        tiles, titles = [], []
        for i in order[:max_images]:
            img = dataset.read_image(i)
            heat = upsample_map(segs[i], img.shape[:2])
            gt = dataset.full_mask(i)
            gt_img = (gt.astype(np.uint8) * 255) if gt is not None else np.zeros(img.shape[:2], np.uint8)
            tiles.append(np.concatenate([np.asarray(overlay_heatmap(img, np.clip(heat, 0, 1)), dtype=np.uint8),
                                         np.repeat(gt_img[..., None], 3, axis=2)], axis=1))
            titles.append(f"{rows[i]['name']} p={rows[i]['score']:.3f} y={rows[i]['label']}")
        files["heatmaps"] = str(save_image(image_grid(tiles, nrow=4, titles=titles), out / "heatmaps.jpg"))
    return files


def public_metrics(res: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in res.items() if k not in ("per_image", "_segs", "pr_curve", "roc_curve")}


def record_validation(model: nn.Module, val_ds: DefectDataset, out: Path, spec: dict[str, Any],
                      batch: int = 8) -> dict[str, float]:
    """Evaluate a run's model on its validation images and write their best-F1 decision threshold (what
    ``defect predict`` uses) and AP / AUROC into the run's ``segdec.json`` (``spec``, updated); returns them."""
    from .spec import SPEC_FILE

    res = evaluate_segdec(model, val_ds, batch=batch, pixel=False)
    figures = {k: float(res[k]) for k in ("AP", "AUROC", "threshold")}
    spec["threshold"] = figures["threshold"]
    spec["validation_metrics"] = figures
    write_json_atomic(Path(out) / SPEC_FILE, spec)
    return figures
