"""Detection metrics: COCO AP/AR, per-class AP and PR curves through pycocotools' COCOeval; confusion matrix and
P / R / F1 against confidence (the pictures ultralytics draws)."""

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


# ------------------------------------------------------------------------------------------------
# Confusion matrix and P / R / F1 against confidence (the pictures ultralytics draws)

GroundTruth = Any  # Sequence[(boxes xyxy [N, 4], labels [N])] indexed by image id, or a Mapping id -> that


def _per_image(
    gt: GroundTruth, preds: Sequence[dict], num_classes: int, where: str
) -> list[tuple[Any, np.ndarray, Any, np.ndarray, np.ndarray]]:
    """Pair each image's ground truth with its predictions (all images of ``gt``; several dicts per image merge).

    Returns ``[(gt_boxes [N, 4], gt_labels [N], pred_boxes [M, 4], pred_scores [M], pred_labels [M])]`` (numpy).
    """
    if num_classes < 1:
        raise ValueError(f"{where}: num_classes must be >= 1 (got {num_classes})")
    ids = list(gt.keys()) if hasattr(gt, "keys") else list(range(len(gt)))
    by_image: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {int(i): [] for i in ids}
    for k, p in enumerate(preds):
        if "image_id" not in p:
            raise ValueError(f"{where}: prediction #{k} has no 'image_id'")
        image_id = int(_np(p["image_id"], np.int64).reshape(-1)[0])
        if image_id not in by_image:
            raise ValueError(f"{where}: prediction #{k} has image_id {image_id}, which is not in the ground truth "
                             f"({len(by_image)} images)")
        boxes = _np(p.get("boxes", np.zeros((0, 4))), np.float64).reshape(-1, 4)
        scores = _np(p.get("scores", []), np.float64).reshape(-1)
        labels = _np(p.get("labels", []), np.int64).reshape(-1)
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(f"{where}: prediction #{k} (image {image_id}) has {len(boxes)} boxes, "
                             f"{len(scores)} scores and {len(labels)} labels")
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if bad.size:
            raise ValueError(f"{where}: prediction #{k} (image {image_id}) has label {int(bad[0])}, "
                             f"outside 0..{num_classes - 1}")
        by_image[image_id].append((boxes, scores, labels))
    out = []
    for i in ids:
        g = gt[i]
        gb = _np(g[0], np.float64).reshape(-1, 4)
        gl = _np(g[1], np.int64).reshape(-1)
        if len(gb) != len(gl):
            raise ValueError(f"{where}: ground truth of image {i} has {len(gb)} boxes but {len(gl)} labels")
        bad = gl[(gl < 0) | (gl >= num_classes)]
        if bad.size:
            raise ValueError(f"{where}: ground truth of image {i} has label {int(bad[0])}, outside 0..{num_classes - 1}")
        parts = by_image[int(i)]
        pb = np.concatenate([b for b, _, _ in parts]) if parts else np.zeros((0, 4))
        ps = np.concatenate([s for _, s, _ in parts]) if parts else np.zeros(0)
        pl = np.concatenate([c for _, _, c in parts]) if parts else np.zeros(0, np.int64)
        out.append((gb, gl, pb, ps, pl))
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix [len(a), len(b)] of xyxy boxes (torchvision.ops.box_iou)."""
    import torch
    from torchvision.ops import box_iou

    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    return box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()


def detection_confusion_matrix(
    gt: GroundTruth,
    preds: Sequence[dict],
    num_classes: int,
    iou_thresh: float = 0.45,
    conf_thresh: float = 0.25,
) -> np.ndarray:
    """Detection confusion matrix [C+1, C+1] of counts: rows = predicted class, columns = true class (ultralytics).

    Index ``C`` is background. Predictions with score >= ``conf_thresh`` are matched to ground truth class-agnostically,
    greedily by IoU (highest first, one-to-one, IoU >= ``iou_thresh``); a match counts at (predicted, true) class,
    an unmatched gt at (background, true) (missed), an unmatched prediction at (predicted, background) (false alarm).
    ``gt[i]`` = (boxes xyxy [N, 4], labels [N]) of image i (``DetectionDataset.annotations(i)``); ``preds`` are dicts
    with ``image_id``, ``boxes`` [M, 4], ``scores`` [M], ``labels`` [M] (``run_inference``).
    """
    C = int(num_classes)
    m = np.zeros((C + 1, C + 1), dtype=np.int64)
    for gb, gl, pb, ps, pl in _per_image(gt, preds, C, "detection_confusion_matrix"):
        keep = ps >= conf_thresh
        pb, pl = pb[keep], pl[keep]
        iou = _iou(gb, pb)
        gi, pi = np.nonzero(iou >= iou_thresh)
        order = np.argsort(-iou[gi, pi], kind="stable")  # greedy: best-overlapping pair first
        gt_used = np.zeros(len(gb), bool)
        pred_used = np.zeros(len(pb), bool)
        for g, p in zip(gi[order], pi[order], strict=True):
            if not gt_used[g] and not pred_used[p]:
                gt_used[g] = pred_used[p] = True
                m[pl[p], gl[g]] += 1
        np.add.at(m, (C, gl[~gt_used]), 1)  # missed ground truth
        np.add.at(m, (pl[~pred_used], C), 1)  # predictions on background
    return m


def confidence_curves(
    gt: GroundTruth,
    preds: Sequence[dict],
    num_classes: int,
    iou_thresh: float = 0.5,
    n_points: int = 101,
) -> dict[str, Any]:
    """Precision, recall and F1 of the detections with score >= c, for c on a grid over [0, 1].

    Per image and class, predictions in descending score each take the unmatched gt of their class with the highest
    IoU >= ``iou_thresh`` (TP) or none (FP). Where a class has no prediction at or above c, precision is 1 (no false
    positive). Classes without ground truth get nan rows and stay out of the "all classes" curves, which are the
    mean over classes (as ultralytics). Returns ``conf`` [n]; ``precision``, ``recall``, ``f1`` [C, n];
    ``precision_all``, ``recall_all``, ``f1_all`` [n]; ``best_f1``, ``best_conf`` (highest c reaching the best
    all-class F1), ``best_precision``, ``best_recall``; ``num_gt`` [C], ``num_pred`` [C]; ``iou_thresh``.
    """
    C = int(num_classes)
    if n_points < 2:
        raise ValueError(f"confidence_curves: n_points must be >= 2 (got {n_points})")
    scores_by_class: list[list[np.ndarray]] = [[] for _ in range(C)]
    tp_by_class: list[list[np.ndarray]] = [[] for _ in range(C)]
    num_gt = np.zeros(C, dtype=np.int64)
    for gb, gl, pb, ps, pl in _per_image(gt, preds, C, "confidence_curves"):
        np.add.at(num_gt, gl, 1)
        iou = _iou(gb, pb)
        for k in np.unique(pl):
            pk = np.nonzero(pl == k)[0]
            pk = pk[np.argsort(-ps[pk], kind="stable")]
            gk = np.nonzero(gl == k)[0]
            used = np.zeros(len(gk), bool)
            tp = np.zeros(len(pk), bool)
            for j, p in enumerate(pk):
                if not len(gk):
                    break
                cand = np.where(used, -1.0, iou[gk, p])
                best = int(np.argmax(cand))
                if cand[best] >= iou_thresh:
                    used[best] = tp[j] = True
            scores_by_class[k].append(ps[pk])
            tp_by_class[k].append(tp)

    conf = np.linspace(0.0, 1.0, int(n_points))
    eps = 1e-6  # a float32 score of 0.9 (0.89999998) still counts at c = 0.9
    precision = np.full((C, len(conf)), np.nan)
    recall = np.full((C, len(conf)), np.nan)
    num_pred = np.zeros(C, dtype=np.int64)
    for k in range(C):
        s = np.concatenate(scores_by_class[k]) if scores_by_class[k] else np.zeros(0)
        t = np.concatenate(tp_by_class[k]) if tp_by_class[k] else np.zeros(0, bool)
        num_pred[k] = len(s)
        if num_gt[k] == 0:
            continue
        order = np.argsort(-s, kind="stable")
        s, t = s[order], t[order]
        tp_cum = np.concatenate([[0], np.cumsum(t)])
        n_above = len(s) - np.searchsorted(s[::-1], conf - eps, side="left")  # preds with score >= c
        tp_c = tp_cum[n_above]
        precision[k] = np.where(n_above > 0, tp_c / np.maximum(n_above, 1), 1.0)
        recall[k] = tp_c / num_gt[k]
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    f1[np.isnan(precision)] = np.nan
    has_gt = num_gt > 0
    if has_gt.any():
        p_all, r_all, f1_all = (a[has_gt].mean(0) for a in (precision, recall, f1))
        top = float(f1_all.max())
        i = int(np.nonzero(f1_all >= top - 1e-12)[0][-1])
        best = {"best_f1": top, "best_conf": float(conf[i]), "best_precision": float(p_all[i]),
                "best_recall": float(r_all[i])}
    else:
        p_all = r_all = f1_all = np.full(len(conf), np.nan)
        best = dict.fromkeys(("best_f1", "best_conf", "best_precision", "best_recall"), float("nan"))
    return {"conf": conf, "precision": precision, "recall": recall, "f1": f1, "precision_all": p_all,
            "recall_all": r_all, "f1_all": f1_all, **best, "num_gt": num_gt, "num_pred": num_pred,
            "iou_thresh": float(iou_thresh)}
