"""Detection metrics through pycocotools' COCOeval (COCO AP/AR, per-class AP, PR curves)."""

from __future__ import annotations

import contextlib
import copy
import io
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

SUMMARY_KEYS: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _np(x: Any, dtype: Any = np.float64) -> np.ndarray:
    """Tensor / array / list -> numpy array on CPU."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().float() if str(x.dtype) == "torch.bfloat16" else x.detach().cpu()
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


def _nan_if_missing(v: float) -> float:
    """COCOeval writes -1 where nothing could be measured; report that as nan."""
    v = float(v)
    return float("nan") if v < 0 else v


def _prepare_gt(gt: dict) -> dict:
    """Deep-copy a COCO gt dict and fill the fields COCOeval needs (positive ids, area, iscrowd)."""
    ds = copy.deepcopy(gt)
    ds.setdefault("info", {})
    ds.setdefault("images", [])
    ds.setdefault("categories", [])
    anns = ds.setdefault("annotations", [])
    ids = [a.get("id") for a in anns]
    # COCOeval treats a matched gt id of 0 as "unmatched"; renumber unless ids are positive and unique.
    renumber = any(i is None or i <= 0 for i in ids) or len(set(ids)) != len(ids)
    for k, a in enumerate(anns):
        if renumber:
            a["id"] = k + 1
        a.setdefault("iscrowd", 0)
        if "area" not in a:
            x, y, w, h = a["bbox"]
            a["area"] = float(w) * float(h)
    return ds


def _to_results(predictions: Sequence[dict], iou_type: str, known_images: set[int]) -> list[dict]:
    """Per-image prediction dicts (xyxy boxes, 0-based labels) -> COCO result records."""
    results: list[dict] = []
    for k, pred in enumerate(predictions):
        if "image_id" not in pred:
            raise ValueError(f"coco_evaluate: prediction #{k} has no 'image_id'")
        image_id = int(_np(pred["image_id"], np.int64).reshape(-1)[0])
        if image_id not in known_images:
            raise ValueError(f"coco_evaluate: prediction #{k} has image_id {image_id}, which is not in the ground truth")
        scores = _np(pred.get("scores", []), np.float64).reshape(-1)
        labels = _np(pred.get("labels", []), np.int64).reshape(-1)
        if len(scores) != len(labels):
            raise ValueError(f"coco_evaluate: prediction #{k} has {len(scores)} scores but {len(labels)} labels")
        if iou_type == "bbox":
            boxes = _np(pred.get("boxes", np.zeros((0, 4))), np.float64).reshape(-1, 4)
            if len(boxes) != len(scores):
                raise ValueError(f"coco_evaluate: prediction #{k} has {len(boxes)} boxes but {len(scores)} scores")
            xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
            for b, s, c in zip(xywh, scores, labels, strict=True):
                results.append(
                    {"image_id": image_id, "category_id": int(c) + 1, "bbox": [float(v) for v in b], "score": float(s)}
                )
        else:  # segm
            from pycocotools import mask as mask_utils

            masks = _np(pred.get("masks", np.zeros((0, 1, 1))), np.float64)
            if masks.ndim == 4:
                masks = masks[:, 0]
            if len(masks) != len(scores):
                raise ValueError(f"coco_evaluate: prediction #{k} has {len(masks)} masks but {len(scores)} scores")
            for m, s, c in zip(masks, scores, labels, strict=True):
                rle = mask_utils.encode(np.asfortranarray((m > 0.5).astype(np.uint8)))
                rle["counts"] = rle["counts"].decode("ascii")
                results.append({"image_id": image_id, "category_id": int(c) + 1, "segmentation": rle, "score": float(s)})
    return results


def coco_evaluate(
    gt: dict,
    predictions: Sequence[dict],
    class_names: Sequence[str] | None = None,
    iou_type: str = "bbox",
    quiet: bool = True,
) -> dict[str, Any]:
    """COCO AP/AR of per-image predictions (xyxy, 0-based labels) against a COCO gt dict (category_id = label + 1).

    Returns the 12 COCOeval summary numbers (``AP`` .. ``AR100``, ``ARs/m/l``; nan where COCOeval has -1),
    ``per_class`` {name: AP@[.5:.95]} and ``pr_curves`` {name: (recall[101], precision[101])} at IoU 0.5.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"coco_evaluate: iou_type must be 'bbox' or 'segm' (got {iou_type!r})")
    ds = _prepare_gt(gt)
    known_images = {int(im["id"]) for im in ds["images"]}
    results = _to_results(predictions, iou_type, known_images)

    cat_names = {int(c["id"]): str(c.get("name", c["id"])) for c in ds["categories"]}
    cat_ids = set(cat_names)
    if class_names is not None:
        cat_ids |= set(range(1, len(class_names) + 1))
    cat_ids_sorted = sorted(cat_ids)
    unknown = sorted({r["category_id"] - 1 for r in results} - {c - 1 for c in cat_ids})
    if unknown:
        warnings.warn(f"coco_evaluate: predicted labels {unknown} have no category in the ground truth; ignored",
                      stacklevel=2)

    def name_of(cid: int) -> str:
        if class_names is not None and 0 <= cid - 1 < len(class_names):
            return str(class_names[cid - 1])
        return cat_names.get(cid, str(cid - 1))

    sink = io.StringIO()
    with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
        coco_gt = COCO()
        coco_gt.dataset = ds
        coco_gt.createIndex()
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:  # loadRes cannot take an empty list; an empty result set scores 0 wherever there is gt
            coco_dt = COCO()
            coco_dt.dataset = {"info": {}, "images": list(ds["images"]), "categories": copy.deepcopy(ds["categories"]),
                               "annotations": []}
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        ev.params.catIds = cat_ids_sorted
        ev.params.imgIds = sorted(known_images)
        if cat_ids_sorted and known_images:
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            stats = [_nan_if_missing(v) for v in ev.stats]
            precision = ev.eval["precision"]  # [T, R, K, A, M]
        else:
            stats = [float("nan")] * len(SUMMARY_KEYS)
            precision = -np.ones((len(ev.params.iouThrs), len(ev.params.recThrs), len(cat_ids_sorted), 4, 3))

    out: dict[str, Any] = dict(zip(SUMMARY_KEYS, stats, strict=False))
    recall_thrs = np.asarray(ev.params.recThrs, dtype=np.float64)
    t50 = int(np.argmin(np.abs(np.asarray(ev.params.iouThrs) - 0.5)))
    per_class: dict[str, float] = {}
    pr_curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for k, cid in enumerate(cat_ids_sorted):
        p = precision[:, :, k, 0, -1]  # all IoUs, all recalls; area "all", maxDets 100
        valid = p[p > -1]
        name = name_of(cid)
        per_class[name] = float(valid.mean()) if valid.size else float("nan")
        p50 = precision[t50, :, k, 0, -1].astype(np.float64)
        pr_curves[name] = (recall_thrs.copy(), np.where(p50 > -1, p50, np.nan))
    out["per_class"] = per_class
    out["pr_curves"] = pr_curves
    if not quiet:
        print(format_ap_table(out))
    return out


def _fmt(v: float) -> str:
    return "    -" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100.0 * v:5.1f}"


def format_ap_table(result: dict[str, Any]) -> str:
    """Readable text table (percent) of a ``coco_evaluate`` result: summary row plus per-class AP."""
    keys = [k for k in SUMMARY_KEYS if k in result]
    lines = ["  ".join(f"{k:>5}" for k in keys), "  ".join(_fmt(result[k]) for k in keys)]
    per_class = result.get("per_class") or {}
    if per_class:
        width = max(5, max(len(n) for n in per_class))
        lines += ["", f"{'class':<{width}}  {'AP':>5}  {'AP50':>5}", f"{'-' * width}  -----  -----"]
        curves = result.get("pr_curves") or {}
        for name, ap in per_class.items():
            ap50 = float("nan")
            if name in curves:
                p = np.asarray(curves[name][1], dtype=np.float64)
                ap50 = float(np.nanmean(p)) if np.isfinite(p).any() else float("nan")
            lines.append(f"{name:<{width}}  {_fmt(ap)}  {_fmt(ap50)}")
    lines.append("(percent; '-' = no ground truth for that class / area range)")
    return "\n".join(lines)
