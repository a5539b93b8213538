"""Evaluation pictures of a detector on a dataset: confusion matrix and F1 / P / R against confidence."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vision.metrics import confidence_curves, detection_confusion_matrix
from vision.viz import plot_confidence_curves, plot_confusion_matrix


def save_detection_plots(
    dataset: Any,
    preds: Sequence[dict[str, Any]],
    out: Path,
    class_names: Sequence[str],
    iou_thresh: float = 0.45,
    conf_thresh: float = 0.25,
) -> dict[str, str]:
    """Write confusion_matrix.png, f1_curve.png, p_curve.png and r_curve.png in ``out``; returns their paths.

    Args:
        dataset: has ``len()`` and ``annotations(i)`` -> (boxes xyxy [N, 4], labels [N]); ``preds[k]["image_id"]``
            indexes it.
        preds: per-image dicts with ``image_id``, ``boxes`` [M, 4], ``scores`` [M], ``labels`` [M] (``run_inference``).
        out: output folder (created).
        class_names: one name per class; its length is the number of classes.
        iou_thresh, conf_thresh: matching IoU and minimum score of the confusion matrix (the curves use IoU 0.5
            and every prediction).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = [str(c) for c in class_names]
    gt = [dataset.annotations(i) for i in range(len(dataset))]
    matrix = detection_confusion_matrix(gt, preds, len(names), iou_thresh=iou_thresh, conf_thresh=conf_thresh)
    paths = {"confusion_matrix": plot_confusion_matrix(matrix, names, out / "confusion_matrix.png", normalize=True)}
    curves = confidence_curves(gt, preds, len(names), iou_thresh=0.5)
    for kind in ("f1", "p", "r"):
        paths[f"{kind}_curve"] = plot_confidence_curves(curves, out / f"{kind}_curve.png", kind=kind)
    return {k: str(v) for k, v in paths.items()}
