"""OOD detection metrics (higher score = more in-distribution): AUROC, FPR@95%TPR, AUPR-In, AUPR-Out."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError("ood_metrics: empty score array")
    if not np.all(np.isfinite(a)):
        raise ValueError("ood_metrics: scores contain NaN or inf")
    return a


def fpr_at_tpr(scores_id: Any, scores_ood: Any, tpr: float = 0.95) -> tuple[float, float]:
    """(FPR, threshold): threshold keeps ceil(tpr * n_id) ID scores (those >= it); FPR = share of OOD >= it."""
    sid = np.sort(as_numpy(scores_id))
    sood = as_numpy(scores_ood)
    keep = math.ceil(tpr * len(sid) - 1e-9)
    thr = float(sid[len(sid) - keep]) if keep > 0 else float("inf")
    return float(np.mean(sood >= thr)), thr


def ood_metrics(scores_id: Any, scores_ood: Any) -> dict[str, float]:
    """auroc, fpr95, aupr_in (ID positive), aupr_out (OOD positive, on -score) and the fpr95 threshold."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    sid, sood = as_numpy(scores_id), as_numpy(scores_ood)
    y = np.concatenate([np.ones_like(sid), np.zeros_like(sood)])
    s = np.concatenate([sid, sood])
    fpr95, thr = fpr_at_tpr(sid, sood, 0.95)
    return {
        "auroc": float(roc_auc_score(y, s)),
        "fpr95": fpr95,
        "aupr_in": float(average_precision_score(y, s)),
        "aupr_out": float(average_precision_score(1 - y, -s)),
        "threshold95": thr,
    }


def roc_points(scores_id: Any, scores_ood: Any) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of the ROC curve with ID as the positive class, for plotting."""
    from sklearn.metrics import roc_curve

    sid, sood = as_numpy(scores_id), as_numpy(scores_ood)
    y = np.concatenate([np.ones_like(sid), np.zeros_like(sood)])
    fpr, tpr, _ = roc_curve(y, np.concatenate([sid, sood]))
    return fpr, tpr
