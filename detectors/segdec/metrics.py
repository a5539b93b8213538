"""Image-level metrics of defect probabilities (AP, AUROC, best-F1 threshold, FP at FN = 0) and pixel Dice / IoU."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def image_metrics(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """Image-level metrics of defect probabilities: AP, AUROC, and at the best-F1 threshold FP, FN, detection
    rate (recall), accuracy; FP at FN = 0 (threshold at the lowest-scored defective image); PR/ROC curves."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    if y.size == 0:
        raise ValueError("image_metrics: no samples")
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    out: dict[str, Any] = {"n_images": int(y.size), "n_defective": n_pos, "n_defect_free": n_neg}
    both = n_pos > 0 and n_neg > 0
    out["AP"] = float(average_precision_score(y, s)) if n_pos > 0 else float("nan")
    out["AUROC"] = float(roc_auc_score(y, s)) if both else float("nan")
    if n_pos > 0:
        precision, recall, thr = precision_recall_curve(y, s)
        f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
        ix = int(np.argmax(f1))
        threshold, best_f1 = float(thr[ix]), float(f1[ix])
        out["pr_curve"] = {"precision": precision.tolist(), "recall": recall.tolist()}
    else:
        threshold, best_f1 = 0.5, float("nan")
    decision = s >= threshold
    tp = int((decision & (y == 1)).sum())
    fp = int((decision & (y == 0)).sum())
    fn = int((~decision & (y == 1)).sum())
    tn = int((~decision & (y == 0)).sum())
    out.update(threshold=threshold, F1=best_f1, TP=tp, FP=fp, FN=fn, TN=tn,
               detection_rate=tp / n_pos if n_pos else float("nan"), accuracy=(tp + tn) / y.size)
    # FP at FN = 0: the highest threshold that still finds every defective image
    out["FP_at_FN0"] = int((s[y == 0] >= s[y == 1].min()).sum()) if n_pos else 0
    if both:
        fpr, tpr, _ = roc_curve(y, s)
        out["roc_curve"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    return out


def dice_iou(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    inter = float(np.logical_and(pred, gt).sum())
    ps, gs = float(pred.sum()), float(gt.sum())
    if ps + gs == 0:
        return 1.0, 1.0  # both empty: perfect
    return 2 * inter / (ps + gs), inter / (ps + gs - inter)
