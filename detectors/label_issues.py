"""Label errors after training: rank the images of a detection folder most likely to be mislabelled (a missing box,
a wrong class, a badly placed box) from a trained detector's predictions, with cleanlab's ObjectLab scores
(``cleanlab.object_detection``: ``rank.get_label_quality_scores``, ``filter.find_label_issues`` and the per-type box
scores), not a score of our own.

cleanlab reads a prediction's score as the probability that the box holds an object of its class: a prediction is
"confident" above 0.95 (missing-box and wrong-class scores) and counts for placement above 0.5. An ATSS score is
``sigmoid(cls) * sigmoid(centerness)``: a correct box rarely scores above 0.7, and on a small set trained briefly
0.5. Each split's scores are therefore calibrated first (``calibrate``, Platt scaling): p = sigmoid(a * logit(score)
+ b) fitted to whether each prediction matches a label box of its class at IoU >= 0.5 (greedy in score order, as
COCO matches). The map is monotone, so the order of a model's predictions is kept; it is fitted on the labels under
test, of which only a few are wrong, and being smooth it is not capped by the few wrong labels that sit among the
highest scores (a step-wise isotonic fit was: on 40 images, two planted errors kept its top below 0.95).

Predictions of images a model trained on agree with their labels, wrong ones included. ``folds=K`` cross-fits the
training split: K models, each trained through :func:`detectors.detect.train_detector` with the given run's settings
on K-1 folds, predict the fold they did not see (K trainings on (K-1)/K of the images each). The other splits and,
without folds, the training split are predicted by the given model, and the result says which images it saw.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vision.data.report_sections import ReportContext, ReportSection, register_section

log = logging.getLogger(__name__)

__all__ = [
    "ISSUE_TYPES",
    "LabelIssueConfig",
    "LabelIssues",
    "Quality",
    "ScoreCalibration",
    "cleanlab_labels",
    "cleanlab_predictions",
    "cost_line",
    "cross_fit_predictions",
    "describe",
    "fold_of",
    "fold_settings",
    "issue_types",
    "label_issues_section",
    "label_quality",
    "match_predictions",
    "predict_splits",
    "rank_label_issues",
    "save_label_issues",
    "score_images",
    "to_csv",
]

# cleanlab's issue types, in its names, and what they mean for a user
ISSUE_TYPES = {"overlooked": "missing box", "swap": "wrong class", "badloc": "badly placed box"}
TYPE_THRESHOLD = 0.5  # an image's issue type is named when its pooled score (0..1, low = suspect) is below this
MATCH_IOU = 0.5  # a prediction matching a label box of its class at this IoU counts as correct for the calibration
CONFIDENT = 0.95  # cleanlab's HIGH_PROBABILITY_THRESHOLD: the confidence its missing-box / wrong-class scores use
PLACED = 0.5  # cleanlab's LOW_PROBABILITY_THRESHOLD: predictions its placement score compares a label box with
SHOW_PROB = 0.5  # predictions drawn in the pictures: calibrated probability at least this
# calibrated predictions below this are not given to cleanlab: they reach none of its thresholds (0.5, 0.95) and only
# slow its pairwise loops; on the planted set leaving them out kept every rank and flag and halved the time
MIN_PROB = 0.01
PICTURE_SIDE = 320  # pictures are drawn at least this large (longer side), small images upscaled
HTML_PICTURE_SIDE = 520  # a label | prediction pair fits this square on the report page
MARKS = {"swap": "wrong class?", "badloc": "misplaced?", "overlooked": "missing?"}  # captions of suspect boxes
OUT_NAME = "label_issues"  # the output folder under a report or eval folder


# ----------------------------------------------------------------------------------------------- settings
@dataclass
class LabelIssueConfig:
    """How label issues are ranked.

    Attributes:
        splits: the splits to rank (default: every split of the folder: train, val, test).
        folds: K >= 2 cross-fits the training split (K trainings of the given run's settings on K-1 folds, each
            predicting the fold it did not see); 0: the given model predicts every split.
        top: pictures (label | prediction) written for the N lowest-scored images.
        calibrate: map each split's scores to precision before cleanlab reads them as probabilities.
        batch_size: images per forward pass.
        device: "cpu", "cuda", "cuda:N", "mps"; None: the best available.
        seed: the fold assignment (the fold trainings use the run's own seed).
        workers: DataLoader workers (inference and fold trainings).
        skip_bad: drop unreadable images / bad boxes instead of stopping (as ``--skip-bad``).
        progress: progress bars.
    """

    splits: tuple[str, ...] | None = None
    folds: int = 0
    top: int = 20
    calibrate: bool = True
    batch_size: int = 8
    device: str | None = None
    seed: int = 0
    workers: int = 0
    skip_bad: bool = False
    progress: bool = True


@dataclass
class LabelIssues:
    """The ranked images and how they were predicted.

    Attributes:
        rows: one dict per image, lowest label quality first: ``rank``, ``split``, ``index`` (in the split),
            ``file``, ``score`` (cleanlab's label quality, 0..1), ``issue`` (flagged by ``find_label_issues``),
            ``types`` (issue types, :func:`issue_types`), ``type_scores`` (type -> pooled score), ``labels`` (label
            boxes), ``predictions`` (predicted boxes with probability >= 0.5), ``suspects`` (the boxes behind the
            types), ``predicted_by`` ("model" or "fold k"), ``picture`` (when written).
        sources: split -> how its images were predicted (one line each).
        saw: split -> True when the model that predicted it trained on those images (None: unknown).
        folds: K of the cross-fit (0: none), with ``fold_runs`` the fold run folders.
        calibration: split -> the calibration's points (score -> probability) and its counts.
        seconds: time per phase (``predict``, ``cross_fit``, ``score``).
        classes: class names.
    """

    rows: list[dict[str, Any]]
    sources: dict[str, str]
    saw: dict[str, bool | None]
    folds: int = 0
    fold_runs: list[str] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)

    @property
    def flagged(self) -> list[dict[str, Any]]:
        """The rows cleanlab's ``find_label_issues`` flags, in rank order."""
        return [r for r in self.rows if r["issue"]]

    def summary(self) -> dict[str, Any]:
        """Counts: images, flagged images, flagged images per issue type, per split."""
        by_type = {t: sum(1 for r in self.flagged if t in r["types"]) for t in ISSUE_TYPES}
        by_split: dict[str, dict[str, int]] = {}
        for r in self.rows:
            s = by_split.setdefault(r["split"], {"images": 0, "flagged": 0})
            s["images"] += 1
            s["flagged"] += int(r["issue"])
        return {"images": len(self.rows), "flagged": len(self.flagged), "by_type": by_type, "by_split": by_split}


# ----------------------------------------------------------------------------------------------- formats
def cleanlab_labels(ds: Any, indices: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """cleanlab's labels of a :class:`vision.data.DetectionDataset`: per image ``{"bboxes": float32 [L, 4] xyxy
    pixels, "labels": int64 [L] (0-based), "image_name": path}``."""
    out = []
    for i in range(len(ds)) if indices is None else indices:
        boxes, labels = ds.annotations(i)
        out.append({"bboxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                    "labels": np.asarray(labels, dtype=np.int64).reshape(-1),
                    "image_name": str(ds.image_paths[i])})
    return out


def cleanlab_predictions(preds: Sequence[dict[str, Any]], num_classes: int,
                         calibration: ScoreCalibration | None = None, min_score: float = 0.0) -> list[list[np.ndarray]]:
    """cleanlab's predictions of a detector's outputs (per image ``boxes`` xyxy, ``scores``, ``labels`` in image
    pixels): per image a list of ``num_classes`` float32 arrays [M_k, 5] (x1, y1, x2, y2, score), the boxes of class
    k in the detector's order; scores through ``calibration`` when given, those below ``min_score`` left out."""
    out = []
    for p in preds:
        boxes = _np(p["boxes"], np.float32).reshape(-1, 4)
        scores = _np(p["scores"], np.float32).reshape(-1)
        labels = _np(p["labels"], np.int64).reshape(-1)
        if calibration is not None:
            scores = calibration(scores)
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"a prediction has class {int(labels.max())} but the data has {num_classes} classes")
        out.append([np.concatenate([boxes[m], scores[m, None]], axis=1).astype(np.float32)
                    for m in ((labels == k) & (scores >= min_score) for k in range(num_classes))])
    return out


def _logit(s: np.ndarray) -> np.ndarray:
    s = np.clip(s, 1e-6, 1 - 1e-6)
    return np.log(s / (1 - s))


def _np(x: Any, dtype: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _order(preds_k: list[np.ndarray]) -> list[tuple[int, int]]:
    """(class, row) of each box in cleanlab's flattened order of one image's per-class arrays."""
    return [(k, j) for k, arr in enumerate(preds_k) for j in range(len(arr))]


# ----------------------------------------------------------------------------------------------- calibration
def match_predictions(preds_k: Sequence[list[np.ndarray]], labels: Sequence[dict[str, Any]],
                      iou: float = MATCH_IOU) -> tuple[np.ndarray, np.ndarray]:
    """(scores, correct) of every prediction: correct when it matches a not yet matched label box of its class at
    IoU >= ``iou``, predictions taken in descending score order per image (COCO's greedy matching)."""
    from torchvision.ops import box_iou

    scores, correct = [], []
    for pk, lab in zip(preds_k, labels, strict=True):
        flat = np.concatenate(pk, axis=0) if pk else np.zeros((0, 5), np.float32)
        cls = np.concatenate([np.full(len(a), k) for k, a in enumerate(pk)]) if pk else np.zeros(0, int)
        lb, ll = lab["bboxes"], lab["labels"]
        ious = (box_iou(torch.as_tensor(flat[:, :4]), torch.as_tensor(lb)).numpy() if len(flat) and len(ll)
                else np.zeros((len(flat), len(ll))))
        used = np.zeros(len(ll), bool)
        for j in np.argsort(-flat[:, 4], kind="stable"):
            ok = (ll == cls[j]) & ~used & (ious[j] >= iou)
            if ok.any():
                used[int(np.argmax(np.where(ok, ious[j], -1.0)))] = True
            scores.append(float(flat[j, 4]))
            correct.append(bool(ok.any()))
    return np.asarray(scores, np.float64), np.asarray(correct, bool)


class ScoreCalibration:
    """Score -> probability by Platt scaling: a logistic fit of "the prediction is correct" on the logit of its
    score, p = sigmoid(a * logit(score) + b) (monotone for a > 0; smooth, so a few wrong labels among the highest
    scores do not cap the map the way a step-wise fit would)."""

    def __init__(self, scores: np.ndarray, correct: np.ndarray) -> None:
        from sklearn.linear_model import LogisticRegression

        s = np.asarray(scores, np.float64).reshape(-1)
        c = np.asarray(correct, bool).reshape(-1)
        self.n, self.n_correct = int(len(s)), int(c.sum())
        self.a, self.b = 0.0, -np.inf  # nothing matched: every prediction is wrong as far as the labels tell
        if 0 < self.n_correct < self.n:
            fit = LogisticRegression(C=1e6, max_iter=1000).fit(_logit(s)[:, None], c)
            self.a, self.b = float(fit.coef_[0, 0]), float(fit.intercept_[0])
        elif self.n and self.n_correct == self.n:  # every prediction correct: keep the scores' order, near 1
            self.a, self.b = 1.0, 10.0

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        s = np.asarray(scores, np.float64).reshape(-1)
        if not np.isfinite(self.b):
            return np.zeros_like(s, dtype=np.float32)
        z = self.a * _logit(s) + self.b
        return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)

    def points(self, at: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)) -> dict[str, Any]:
        """The map at a few scores, the score where it first reaches cleanlab's 0.95, and the counts (JSON)."""
        probs = self(np.asarray(at))
        grid = np.linspace(0.0, 1.0, 1001)
        reach = grid[self(grid) >= CONFIDENT]
        return {"predictions": self.n, "correct": self.n_correct, "a": round(self.a, 4), "b": round(self.b, 4),
                "map": {f"{a:g}": round(float(p), 4) for a, p in zip(at, probs, strict=True)},
                "confident_from_score": round(float(reach[0]), 3) if len(reach) else None}


# ----------------------------------------------------------------------------------------------- cleanlab
@dataclass
class Quality:
    """cleanlab's results for a list of images: per image ``score`` (label quality, 0..1, low = suspect), ``issue``
    (``find_label_issues``), ``type_scores`` (type -> pooled per-image score) and ``box_scores`` (type -> per image
    per-box scores: per label box for swap / badloc, per prediction for overlooked, NaN where it does not apply)."""

    score: np.ndarray
    issue: np.ndarray
    type_scores: dict[str, np.ndarray]
    box_scores: dict[str, list[np.ndarray]]


def label_quality(labels: list[dict[str, Any]], predictions: list[list[np.ndarray]]) -> Quality:
    """cleanlab's ObjectLab scores (its default settings) for images with ``labels`` and ``predictions`` in its
    formats (:func:`cleanlab_labels`, :func:`cleanlab_predictions`)."""
    import warnings

    from cleanlab.object_detection.filter import find_label_issues
    from cleanlab.object_detection.rank import (
        compute_badloc_box_scores,
        compute_overlooked_box_scores,
        compute_swap_box_scores,
        get_label_quality_scores,
        pool_box_scores_per_image,
    )

    if not labels:
        empty = np.zeros(0)
        return Quality(empty, empty.astype(bool), {t: empty for t in ISSUE_TYPES}, {t: [] for t in ISSUE_TYPES})
    with warnings.catch_warnings():  # cleanlab warns per image without predictions; the rows say so
        warnings.simplefilter("ignore")
        score = np.asarray(get_label_quality_scores(labels, predictions, verbose=False), np.float64)
        issue = np.asarray(find_label_issues(labels, predictions), bool)
        box = {"overlooked": compute_overlooked_box_scores(labels=labels, predictions=predictions),
               "swap": compute_swap_box_scores(labels=labels, predictions=predictions),
               "badloc": compute_badloc_box_scores(labels=labels, predictions=predictions)}
        pooled = {t: np.asarray(pool_box_scores_per_image([np.asarray(b, np.float64).copy() for b in v]), np.float64)
                  for t, v in box.items()}
    return Quality(score, issue, pooled, box)


def _suspects(lab: dict[str, Any], pk: list[np.ndarray], box: dict[str, np.ndarray],
              classes: Sequence[str]) -> list[dict[str, Any]]:
    """The boxes behind an image's low type scores (score < TYPE_THRESHOLD), with what the model predicts there.

    For the reader only: which label box / prediction it is and the prediction nearest to it (by IoU) among those
    cleanlab's score looks at; the scores themselves are cleanlab's."""
    from torchvision.ops import box_iou

    flat = np.concatenate(pk, axis=0) if pk else np.zeros((0, 5), np.float32)
    cls = np.array([k for k, _ in _order(pk)], dtype=np.int64)
    lb, ll = lab["bboxes"], lab["labels"]
    ious = (box_iou(torch.as_tensor(lb), torch.as_tensor(flat[:, :4])).numpy() if len(lb) and len(flat)
            else np.zeros((len(lb), len(flat))))

    def name(k: int) -> str:
        return str(classes[k]) if 0 <= k < len(classes) else str(k)

    out: list[dict[str, Any]] = []
    for j, s in enumerate(box["swap"]):
        if np.isfinite(s) and s < TYPE_THRESHOLD:
            cand = np.nonzero((cls != ll[j]) & (flat[:, 4] > CONFIDENT))[0]
            row = {"type": "swap", "score": round(float(s), 4), "box": _box(lb[j]), "label": name(int(ll[j]))}
            if len(cand):
                m = int(cand[np.argmax(ious[j, cand])])
                row.update(predicted=name(int(cls[m])), probability=round(float(flat[m, 4]), 4),
                           predicted_box=_box(flat[m, :4]))
            out.append(row)
    for j, s in enumerate(box["badloc"]):
        if np.isfinite(s) and s < TYPE_THRESHOLD:
            cand = np.nonzero((cls == ll[j]) & (flat[:, 4] > PLACED))[0]
            row = {"type": "badloc", "score": round(float(s), 4), "box": _box(lb[j]), "label": name(int(ll[j]))}
            if len(cand):
                m = int(cand[np.argmax(ious[j, cand])])
                row.update(predicted_box=_box(flat[m, :4]), probability=round(float(flat[m, 4]), 4),
                           iou=round(float(ious[j, m]), 3))
            out.append(row)
    for m, s in enumerate(box["overlooked"]):
        if np.isfinite(s) and s < TYPE_THRESHOLD:
            out.append({"type": "overlooked", "score": round(float(s), 4), "predicted": name(int(cls[m])),
                        "probability": round(float(flat[m, 4]), 4), "predicted_box": _box(flat[m, :4])})
    return sorted(out, key=lambda r: r["score"])


def _box(b: Any) -> list[float]:
    return [round(float(v), 1) for v in b]


def issue_types(issue: bool, type_scores: dict[str, float]) -> list[str]:
    """The issue types of an image: those whose pooled score is below TYPE_THRESHOLD, lowest first; a flagged image
    with none below it gets its lowest type."""
    low = sorted((s, t) for t, s in type_scores.items() if s < TYPE_THRESHOLD)
    if not low and issue:
        low = [min((s, t) for t, s in type_scores.items())]
    return [t for _, t in low]


# ----------------------------------------------------------------------------------------------- cross-fitting
def fold_settings(weights: str | Path, spec: dict[str, Any]) -> tuple[Any, Any, list[str]]:
    """(DetectConfig, TrainConfig, notes) that repeat the run behind ``weights``: the model of its detector.json,
    the schedule of its config.json (``train``), the augmentation of its config.yaml (the command's options); what
    cannot be found takes the defaults, said in the notes."""
    from detectors.detect import DetectConfig
    from vision.engine import TrainConfig
    from vision.engine.run import find_spec, read_run_options, read_spec

    notes: list[str] = []
    kw = dict(spec.get("kwargs", {}))
    backbone = kw.pop("backbone", DetectConfig.backbone)
    img_size = int(kw.pop("min_size", DetectConfig.img_size))
    kw.pop("max_size", None)
    augment: bool | dict[str, Any] = True
    found = read_run_options(weights)
    if found is not None:
        opts = found[0]
        if opts.get("no_augment"):
            augment = False
        elif all(k in opts for k in ("hflip", "scale", "color_jitter")):
            scale = str(opts["scale"])
            rng = None if scale.lower() == "none" else tuple(float(v) for v in scale.split(","))
            augment = {"hflip": float(opts["hflip"]), "scale": rng, "color_jitter": float(opts["color_jitter"])}
    else:
        notes.append("the run has no config.yaml: the fold trainings augment with the defaults")
    det = DetectConfig(model=spec["model"], backbone=backbone, pretrained=spec.get("pretrained_backbone", True),
                       img_size=img_size, augment=augment, model_kwargs=kw)
    cfg_path = find_spec(weights, "config.json")
    train = TrainConfig()
    if cfg_path is not None and isinstance(read_spec(cfg_path).get("train"), dict):
        given = read_spec(cfg_path)["train"]
        names = {f.name for f in dataclasses.fields(TrainConfig)} - {"out_dir", "device", "progress", "keep_last",
                                                                      "num_workers"}
        train = TrainConfig(**{k: v for k, v in given.items() if k in names})
    else:
        notes.append("the run has no config.json: the fold trainings use the detector's default schedule")
    return det, train, notes


def fold_of(n: int, folds: int, seed: int = 0) -> np.ndarray:
    """The fold (0..folds-1) of each of ``n`` images: a seeded permutation dealt round-robin (sizes differ by <= 1)."""
    perm = np.random.default_rng(seed).permutation(n)
    out = np.empty(n, dtype=np.int64)
    out[perm] = np.arange(n) % folds
    return out


def _write_coco(ds: Any, keep: Sequence[int], path: Path) -> None:
    """The images ``keep`` of ``ds`` with their labels as a COCO file naming each image by its absolute path (so the
    fold folders copy no image)."""
    from vision.io import write_json_atomic

    coco = ds.to_coco()  # image ids are dataset indices
    keep_set = {int(i) for i in keep}
    images = []
    for im in coco["images"]:
        if im["id"] in keep_set:
            images.append({**im, "file_name": str(Path(ds.image_paths[im["id"]]).resolve())})
    anns = [a for a in coco["annotations"] if a["image_id"] in keep_set]
    write_json_atomic(path, {**coco, "images": images, "annotations": anns})


def cross_fit_predictions(train_ds: Any, val_ds: Any | None, weights: str | Path, spec: dict[str, Any],
                          work: Path, config: LabelIssueConfig) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """Out-of-fold predictions of every image of ``train_ds``: ``config.folds`` models, each trained with the run's
    settings (:func:`fold_settings`) on the other folds (validated on ``val_ds`` when given, as the run was), predict
    their held-out fold. Returns (predictions in dataset order, fold run folders, notes). Costs K trainings."""
    from torch.utils.data import Subset

    from detectors.detect import load_detector, run_inference, train_detector
    from vision.engine import RunOptions

    k = int(config.folds)
    n = len(train_ds)
    if k < 2 or n < k:
        raise ValueError(f"--folds {k}: need 2 <= folds <= the {n} training images")
    det, train, notes = fold_settings(weights, spec)
    folds = fold_of(n, k, config.seed)
    preds: list[dict[str, Any] | None] = [None] * n
    runs = []
    for f in range(k):
        held = np.nonzero(folds == f)[0]
        fold_dir = work / "folds" / f"fold{f}"
        _write_coco(train_ds, np.nonzero(folds != f)[0], fold_dir / "annotations" / "instances_train.json")
        if val_ds is not None:
            _write_coco(val_ds, range(len(val_ds)), fold_dir / "annotations" / f"instances_{det.val_split}.json")
        log.info("fold %d/%d: training on %d images, predicting %d", f + 1, k, n - len(held), len(held))
        summary = train_detector(fold_dir, det, train,
                                 RunOptions(out=fold_dir / "run", exist_ok=True, device=config.device,
                                            workers=config.workers, progress=config.progress, keep_last=1))
        runs.append(str(summary["out"]))
        model, _ = load_detector(summary["out"], config.device)
        for p in run_inference(model, Subset(train_ds, held.tolist()), config.batch_size, num_workers=config.workers,
                               progress=config.progress):
            preds[p["image_id"]] = {**p, "fold": f}
        del model
    assert all(p is not None for p in preds)
    return preds, runs, notes  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------- ranking
def _trained_folder(weights: str | Path) -> str | None:
    """The data folder the run behind ``weights`` trained on (its config.json), None when it does not say."""
    from vision.engine.run import find_spec, read_spec

    path = find_spec(weights, "config.json")
    return None if path is None else (read_spec(path).get("extra") or {}).get("data") or None


def _same_folder(a: str | Path, b: str | Path) -> bool:
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except OSError:
        return False


OPTIMISTIC = ("it tends to agree with their labels, wrong ones included, so their scores are optimistic (--folds K "
              "predicts each image with a model that did not see it, at the cost of K trainings)")


def _given_model_source(split: str, seen: bool | None, trained: str | None) -> tuple[bool | None, str]:
    """(saw, words) for a split predicted by the given model: whether it trained on these images, as its run says."""
    if split != "train":
        if seen is None:
            return None, "the given model (its run does not say what it trained on)"
        return False, "the given model, which did not train on these images"
    if seen:
        return True, f"the given model, which trained on these images: {OPTIMISTIC}"
    if seen is None:
        return None, f"the given model; its run does not say what it trained on: if these images, {OPTIMISTIC}"
    return False, (f"the given model, trained on another folder ({trained}); if that folder holds these images, "
                   f"{OPTIMISTIC}")


def load_splits(data: str | Path, config: LabelIssueConfig) -> dict[str, Any]:
    """The splits to rank: ``config.splits`` (each must exist) or every split of the folder that exists."""
    from vision.data import DETECTION_SPLITS, SplitNotFoundError, load_detection_dataset

    named = bool(config.splits)
    out = {}
    for s in config.splits or DETECTION_SPLITS:
        try:
            out[s] = load_detection_dataset(data, s, skip_bad=config.skip_bad, progress=config.progress)
        except SplitNotFoundError:
            if named:
                raise
    if not out:
        raise FileNotFoundError(f"{data}: no split of {', '.join(DETECTION_SPLITS)} found")
    return out


def rank_label_issues(data: str | Path, weights: str | Path, out: str | Path | None = None,
                      config: LabelIssueConfig | None = None, datasets: dict[str, Any] | None = None) -> LabelIssues:
    """Rank the images of ``data`` by cleanlab's label quality from the predictions of the detector ``weights``
    (a run folder, checkpoint folder or model.safetensors); with ``out``, write label_issues.json / .csv and the
    pictures of the ``config.top`` lowest there (:func:`save_label_issues`).

    ``datasets`` (split -> loaded :class:`vision.data.DetectionDataset`, no transforms) skips loading ``data`` again.
    ``config.folds`` >= 2 cross-fits the training split (needs ``out``: the fold runs go to ``out/folds``; they are
    validated on the val split as the run was, when the folder has one). ValueError when the model's classes differ
    from the data's.
    """
    config = config or LabelIssueConfig()
    if config.folds and out is None:
        raise ValueError("cross-fitting (folds) needs an output folder for the fold runs")
    if config.folds == 1 or config.folds < 0:
        raise ValueError(f"--folds {config.folds}: use 0 (the given model) or K >= 2")
    splits = dict(datasets) if datasets is not None else load_splits(data, config)
    if config.splits:
        splits = {s: splits[s] for s in config.splits if s in splits}
    res, preds = predict_splits(data, weights, splits, None if out is None else Path(out), config)
    t0 = time.perf_counter()
    res.rows, res.calibration, read = score_images(splits, preds, res.classes, config.calibrate)
    res.seconds["score"] = round(time.perf_counter() - t0, 2)
    if out is not None:
        save_label_issues(res, splits, Path(out), config.top, preds=read)
    return res


def predict_splits(data: str | Path, weights: str | Path, splits: dict[str, Any], out: Path | None,
                   config: LabelIssueConfig) -> tuple[LabelIssues, dict[str, list[dict[str, Any]]]]:
    """The detector's predictions of every split (the training split cross-fitted with ``config.folds`` >= 2) and a
    :class:`LabelIssues` without rows that says how each split was predicted."""
    from detectors.detect import load_detector, run_inference
    from vision.device import pick_device

    device = pick_device(config.device)
    model, spec = load_detector(weights, device)
    classes = list(spec["classes"])
    for s, ds in splits.items():
        if list(ds.classes) != classes:
            raise ValueError(f"classes of {data} (split {s}) {list(ds.classes)} differ from the model's {classes}")
    trained = _trained_folder(weights)
    seen = None if trained is None else _same_folder(trained, data)
    cross = "train" in splits and config.folds >= 2
    res = LabelIssues(rows=[], sources={}, saw={}, folds=int(config.folds) if cross else 0, classes=classes)
    preds: dict[str, list[dict[str, Any]]] = {}
    t0 = time.perf_counter()
    for s, ds in splits.items():
        if not (cross and s == "train"):
            preds[s] = run_inference(model, ds, config.batch_size, device, config.workers, config.progress)
            res.saw[s], res.sources[s] = _given_model_source(s, seen, trained)
    res.seconds["predict"] = round(time.perf_counter() - t0, 2)
    del model  # the fold trainings need the memory
    if cross:
        assert out is not None
        t0 = time.perf_counter()
        val = splits.get("val")
        if val is None:
            val = _optional_split(data, "val", config)
        preds["train"], res.fold_runs, notes = cross_fit_predictions(splits["train"], val, weights, spec, out, config)
        res.seconds["cross_fit"] = round(time.perf_counter() - t0, 2)
        k = config.folds
        res.saw["train"] = False
        res.sources["train"] = (f"cross-fitted: {k} models, each trained with the run's settings on {k - 1}/{k} of "
                                f"the training images, predicted the fold it did not see ({k} trainings)"
                                + "".join(f"; {n}" for n in notes))
    return res, {s: preds[s] for s in splits}


def _optional_split(data: str | Path, split: str, config: LabelIssueConfig) -> Any | None:
    from vision.data import SplitNotFoundError, load_detection_dataset

    try:
        return load_detection_dataset(data, split, skip_bad=config.skip_bad, progress=config.progress)
    except SplitNotFoundError:
        return None


def score_images(splits: dict[str, Any], preds: dict[str, list[dict[str, Any]]], classes: list[str],
                 calibrate: bool = True) -> tuple[list[dict[str, Any]], dict[str, Any], dict[tuple[str, int], Any]]:
    """(ranked rows, calibration per split, (split, index) -> the image's predictions as cleanlab read them):
    every image of every split scored by cleanlab in one call, each split's scores calibrated on that split first
    (``calibrate``); rows lowest label quality first."""
    all_labels: list[dict[str, Any]] = []
    all_preds: list[list[np.ndarray]] = []
    where: list[tuple[str, int]] = []
    calibration: dict[str, Any] = {}
    for s, ds in splits.items():
        labels = cleanlab_labels(ds)
        pk = cleanlab_predictions(preds[s], len(classes))
        if calibrate:
            cal = ScoreCalibration(*match_predictions(pk, labels))
            calibration[s] = cal.points()
            pk = cleanlab_predictions(preds[s], len(classes), cal, MIN_PROB)
        all_labels += labels
        all_preds += pk
        where += [(s, i) for i in range(len(ds))]
    q = label_quality(all_labels, all_preds)
    rows = []
    for n, (s, i) in enumerate(where):
        ts = {t: round(float(q.type_scores[t][n]), 4) for t in ISSUE_TYPES}
        box = {t: np.asarray(q.box_scores[t][n], np.float64) for t in ISSUE_TYPES}
        pk = all_preds[n]
        rows.append({
            "split": s, "index": i, "file": str(splits[s].image_paths[i]), "score": round(float(q.score[n]), 6),
            "issue": bool(q.issue[n]), "types": issue_types(bool(q.issue[n]), ts), "type_scores": ts,
            "labels": int(len(all_labels[n]["labels"])),
            "predictions": int(sum(int((a[:, 4] >= SHOW_PROB).sum()) for a in pk)),
            "suspects": _suspects(all_labels[n], pk, box, classes),
            "predicted_by": f"fold {preds[s][i]['fold']}" if "fold" in preds[s][i] else "model",
        })
    order = sorted(range(len(rows)), key=lambda n: (rows[n]["score"], not rows[n]["issue"], n))
    ranked = [{"rank": r, **rows[n]} for r, n in enumerate(order, start=1)]
    return ranked, calibration, dict(zip(where, all_preds, strict=True))


# ----------------------------------------------------------------------------------------------- outputs
CSV_FIELDS = ("rank", "split", "file", "score", "issue", "types", "overlooked", "swap", "badloc", "labels",
              "predictions", "predicted_by")


def to_csv(res: LabelIssues) -> str:
    """The ranked list as CSV text: one row per image (issue types joined by ``;``; per-type pooled scores)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for r in res.rows:
        w.writerow([r["rank"], r["split"], r["file"], f"{r['score']:.6f}", int(r["issue"]), ";".join(r["types"]),
                    *(f"{r['type_scores'][t]:.4f}" for t in ISSUE_TYPES), r["labels"], r["predictions"],
                    r["predicted_by"]])
    return buf.getvalue()


def pair_picture(ds: Any, index: int, preds_k: list[np.ndarray], row: dict[str, Any], classes: Sequence[str],
                 side: int = PICTURE_SIDE) -> Any:
    """Label | prediction side by side (PIL image): the image with its label boxes (the suspect boxes outlined
    again, thicker, captioned "wrong class?", "misplaced?", or "missing?" for a confident prediction without a
    label) and with the predictions whose calibrated probability is at least SHOW_PROB."""
    from PIL import Image

    from vision.viz import draw_boxes, image_grid

    img = Image.fromarray(ds.load_image(index))
    scale = max(1.0, side / max(img.size))
    if scale > 1:
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BILINEAR)
    boxes, labels = ds.annotations(index)
    width = max(2, round(max(img.size) / 200))
    font = max(12, round(max(img.size) / 24))
    left = draw_boxes(img, np.asarray(boxes) * scale, labels, class_names=classes, width=width, font_size=font)
    for t, word in MARKS.items():  # the suspect boxes again, thicker, named by their issue type
        marks = [s.get("box", s.get("predicted_box")) for s in row["suspects"] if s["type"] == t]
        if marks:
            left = draw_boxes(left, np.asarray(marks, np.float64) * scale, [0] * len(marks), class_names=[word],
                              color_by_class=False, width=2 * width + 1, font_size=font)
    flat = np.concatenate(preds_k, axis=0) if preds_k else np.zeros((0, 5))
    cls = np.array([k for k, _ in _order(preds_k)], dtype=np.int64)
    keep = flat[:, 4] >= SHOW_PROB
    right = draw_boxes(img, flat[keep, :4] * scale, cls[keep], flat[keep, 4], class_names=classes, width=width,
                       font_size=font)
    titles = [f"#{row['rank']} label", f"prediction, p >= {SHOW_PROB}"]  # the issue types caption the boxes
    return image_grid([left, right], nrow=2, titles=titles)


def save_label_issues(res: LabelIssues, splits: dict[str, Any], out: Path, top: int = 20,
                      preds: dict[tuple[str, int], Any] | None = None) -> dict[str, str]:
    """Write ``out/label_issues.json`` (sources, calibration, every ranked row), ``out/label_issues.csv`` and
    ``out/pictures/NNN_split_name.jpg`` (label | prediction) for the ``top`` lowest; returns the paths."""
    from vision.io import write_json_atomic, write_text_atomic
    from vision.viz import save_image

    out.mkdir(parents=True, exist_ok=True)
    pictures = []
    if preds is not None:
        for row in res.rows[:top]:
            key = (row["split"], row["index"])
            pic = pair_picture(splits[row["split"]], row["index"], preds[key], row, res.classes)
            path = out / "pictures" / f"{row['rank']:03d}_{row['split']}_{Path(row['file']).stem}.jpg"
            save_image(pic, path)
            pictures.append(str(path))
            row["picture"] = str(path)
    doc = {"summary": res.summary(), "sources": res.sources, "saw": res.saw, "folds": res.folds,
           "fold_runs": res.fold_runs, "calibration": res.calibration, "seconds": res.seconds,
           "issue_types": ISSUE_TYPES, "type_threshold": TYPE_THRESHOLD, "classes": res.classes, "images": res.rows}
    write_json_atomic(out / "label_issues.json", doc)
    write_text_atomic(out / "label_issues.csv", to_csv(res))
    return {"json": str(out / "label_issues.json"), "csv": str(out / "label_issues.csv"), "pictures": pictures}


def describe(row: dict[str, Any]) -> str:
    """One line for a ranked image: its issue types, the suspect boxes in words."""
    words = []
    for s in row["suspects"][:3]:
        if s["type"] == "swap":
            words.append(f"box labelled {s['label']} looks like {s.get('predicted', '?')}"
                         + (f" (p {s['probability']:.2f})" if "probability" in s else ""))
        elif s["type"] == "overlooked":
            words.append(f"unlabelled {s['predicted']} at {s['predicted_box']} (p {s['probability']:.2f})")
        else:
            words.append(f"box labelled {s['label']} badly placed"
                         + (f" (IoU {s['iou']:.2f} with the prediction)" if "iou" in s else ""))
    types = ", ".join(ISSUE_TYPES[t] for t in row["types"]) or "no issue type below 0.5"
    return f"{types}" + (f": {'; '.join(words)}" if words else "")


# ----------------------------------------------------------------------------------------------- report section
@register_section("label_issues", order=50)
def label_issues_section(ctx: ReportContext) -> ReportSection | None:
    """Label issues after training, when the report is given a trained detector (``ctx.options["weights"]``); None
    without one, or for a defect layout. ``ctx.options`` may hold ``folds`` and ``label_issue_top`` (pictures)."""
    from vision.data.report_html import esc, problem_list, table

    weights = ctx.options.get("weights")
    if not weights or not ctx.splits or not all(hasattr(ds, "annotations") for ds in ctx.splits.values()):
        return None
    top = int(ctx.options.get("label_issue_top") or 12)
    config = LabelIssueConfig(folds=int(ctx.options.get("folds") or 0), top=top,
                              progress=bool(ctx.options.get("progress", True)), device=ctx.options.get("device"))
    out = ctx.out / OUT_NAME
    res = rank_label_issues(ctx.data, weights, out, config, datasets=ctx.splits)
    summ = res.summary()
    problems = [f"[{r['split']}] {Path(r['file']).name}: {describe(r)} (label quality {r['score']:.3f})"
                for r in res.flagged]
    rows = [[r["rank"], r["split"], Path(r["file"]).name, r["score"], "yes" if r["issue"] else "",
             ", ".join(ISSUE_TYPES[t] for t in r["types"])] for r in res.rows[:max(top, 20)]]
    pics = "".join(_figure(r) for r in res.rows[:top] if r.get("picture"))
    src = "".join(f"<li><b>{esc(s)}</b>: {esc(v)}</li>" for s, v in res.sources.items())
    by_type = ", ".join(f"{ISSUE_TYPES[t]} {n}" for t, n in summ["by_type"].items())
    html = (f"<p>Images ranked by cleanlab's label quality (ObjectLab: 0..1, low = suspect) from the predictions of "
            f"<code>{esc(weights)}</code>; {summ['flagged']} of {summ['images']} images flagged by "
            f"<code>find_label_issues</code> ({esc(by_type)}). Predicted by:</p><ul>{src}</ul>"
            + problem_list(problems)
            + table(["rank", "split", "image", "quality", "flagged", "issue types"], rows)
            + f"<p>Label | prediction (p &gt;= {SHOW_PROB}), the lowest {top}; the full list: "
            f"{esc(out / 'label_issues.csv')}</p>" + pics)
    figures = {"summary": summ, "sources": res.sources, "saw": res.saw, "folds": res.folds,
               "calibration": res.calibration, "seconds": res.seconds, "files": str(out),
               "top": [{k: v for k, v in r.items() if k != "picture"} for r in res.rows[:max(top, 20)]]}
    return ReportSection(title="Label issues after training", figures=figures, html=html, problems=problems)


def _figure(row: dict[str, Any]) -> str:
    """A ranked image's label | prediction picture as an inline ``<figure>``."""
    from PIL import Image, ImageOps

    from vision.data.report_html import esc, image_data_uri, img_tag

    with Image.open(row["picture"]) as im:  # two pictures a row on the page
        uri = image_data_uri(ImageOps.contain(im.convert("RGB"), (HTML_PICTURE_SIDE, HTML_PICTURE_SIDE)))
    caption = f"#{row['rank']} [{row['split']}] {Path(row['file']).name}: {describe(row)}"
    return f'<figure class="pair">{img_tag(uri, caption)}<figcaption>{esc(caption)}</figcaption></figure>'



def cost_line(folds: int, n_train: int) -> str:
    """What ``--folds K`` costs, in words."""
    if folds < 2:
        return ""
    per = math.ceil(n_train * (folds - 1) / folds)
    return (f"--folds {folds}: {folds} trainings of the run's schedule on ~{per} of {n_train} training images each "
            f"(about {folds - 1} times the images of one training)")
