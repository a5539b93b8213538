"""Detection confusion matrix, P/R/F1-confidence curves and their pictures, checked against hand-counted cases."""

from __future__ import annotations

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np
import pytest
import torch
from PIL import Image

from detectors.plots import save_detection_plots
from vision import viz
from vision.metrics import confidence_curves, detection_confusion_matrix


def _gt(boxes, labels):
    return np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(labels, np.int64)


def _pred(image_id, boxes, scores, labels):
    return {
        "image_id": image_id,
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def _strip(x0, x1):
    """A box spanning x0..x1, y 0..10: IoU of two such boxes is overlap / union along x."""
    return [x0, 0.0, x1, 10.0]


# ------------------------------------------------------------------------------------ confusion matrix


def test_confusion_matrix_three_images_by_hand() -> None:
    gt = [
        _gt([[0, 0, 10, 10], [20, 20, 40, 40]], [0, 1]),  # image 0
        _gt([[0, 0, 10, 10]], [2]),  # image 1: no prediction dict at all -> missed
        _gt(np.zeros((0, 4)), []),  # image 2: no ground truth
    ]
    preds = [
        _pred(0, [[0, 0, 10, 10], [21, 21, 40, 40], [100, 100, 110, 110], [0, 0, 10, 10]],
              [0.9, 0.8, 0.7, 0.1], [0, 0, 1, 1]),
        _pred(2, [[0, 0, 5, 5]], [0.5], [2]),
    ]
    m = detection_confusion_matrix(gt, preds, num_classes=3)
    expected = np.zeros((4, 4), np.int64)  # rows predicted, columns true, index 3 = background
    expected[0, 0] = 1  # right box, right class
    expected[0, 1] = 1  # class-agnostic match: true class 1 predicted as 0
    expected[1, 3] = 1  # box on nothing
    expected[3, 2] = 1  # image 1's gt never found
    expected[2, 3] = 1  # image 2: prediction on an image without gt
    # the score-0.1 duplicate is under conf_thresh and not counted at all
    np.testing.assert_array_equal(m, expected)
    assert m.dtype == np.int64
    assert m[:, :3].sum(0).tolist() == [1, 1, 1]  # every gt counted exactly once


def test_confusion_matrix_greedy_by_iou_not_by_score() -> None:
    gt = [_gt([_strip(0, 10)], [0])]
    # P1 (IoU 8/12 = 0.67, higher score, class 1) and P2 (IoU 9/11 = 0.82, class 0) both overlap the one gt
    preds = [_pred(0, [_strip(2, 12), _strip(1, 11)], [0.9, 0.5], [1, 0])]
    m = detection_confusion_matrix(gt, preds, num_classes=2)
    assert m[0, 0] == 1 and m[1, 2] == 1 and m.sum() == 2


def test_confusion_matrix_one_to_one_and_thresholds() -> None:
    # G1 = 0..10, G2 = 4..14; P1 = 1..11 (IoU .82 with G1, .54 with G2), P2 = 5..15 (IoU .33 with G1, .82 with G2)
    gt = [_gt([_strip(0, 10), _strip(4, 14)], [0, 1])]
    preds = [_pred(0, [_strip(1, 11), _strip(5, 15)], [0.6, 0.6], [1, 0])]
    m = detection_confusion_matrix(gt, preds, num_classes=2)
    assert m[1, 0] == 1 and m[0, 1] == 1 and m.sum() == 2
    # IoU exactly at the threshold matches; a score exactly at conf_thresh counts
    gt = [_gt([[0, 0, 10, 10]], [0])]
    preds = [_pred(0, [[0, 0, 10, 20]], [0.25], [0])]  # IoU 100 / 200 = 0.5
    assert detection_confusion_matrix(gt, preds, 1, iou_thresh=0.5)[0, 0] == 1
    m = detection_confusion_matrix(gt, preds, 1, iou_thresh=0.51)
    assert m[1, 0] == 1 and m[0, 1] == 1  # missed + false alarm
    assert detection_confusion_matrix(gt, preds, 1, conf_thresh=0.3).tolist() == [[0, 0], [1, 0]]


def test_confusion_matrix_accepts_a_mapping_and_merges_dicts_of_one_image() -> None:
    gt = {7: _gt([[0, 0, 10, 10], [50, 50, 60, 60]], [0, 0])}
    preds = [_pred(7, [[0, 0, 10, 10]], [0.9], [0]), _pred(7, [[50, 50, 60, 60]], [0.9], [0])]
    assert detection_confusion_matrix(gt, preds, 1).tolist() == [[2, 0], [0, 0]]


def test_bad_inputs_name_the_prediction() -> None:
    gt = [_gt([[0, 0, 10, 10]], [0])]
    with pytest.raises(ValueError, match="prediction #0.*label 3"):
        detection_confusion_matrix(gt, [_pred(0, [[0, 0, 1, 1]], [0.9], [3])], 2)
    with pytest.raises(ValueError, match="image_id 5"):
        confidence_curves(gt, [_pred(5, [[0, 0, 1, 1]], [0.9], [0])], 2)
    with pytest.raises(ValueError, match="ground truth of image 0 has label 4"):
        detection_confusion_matrix([_gt([[0, 0, 1, 1]], [4])], [], 2)


# ------------------------------------------------------------------------------------ confidence curves


def _at(curves: dict, c: float) -> int:
    i = int(np.argmin(np.abs(curves["conf"] - c)))
    assert curves["conf"][i] == pytest.approx(c)
    return i


def test_confidence_curves_one_image_by_hand() -> None:
    # 2 gts; scores 0.9 TP, 0.6 FP (box on nothing), 0.3 TP
    gt = [_gt([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0])]
    preds = [_pred(0, [[0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30]], [0.9, 0.6, 0.3], [0, 0, 0])]
    c = confidence_curves(gt, preds, num_classes=1)
    assert c["conf"].shape == (101,) and c["precision"].shape == (1, 101)
    table = {  # conf: (P, R, F1)
        0.0: (2 / 3, 1.0, 0.8),
        0.3: (2 / 3, 1.0, 0.8),  # score exactly at c counts (float32 0.3)
        0.5: (0.5, 0.5, 0.5),
        0.6: (0.5, 0.5, 0.5),
        0.9: (1.0, 0.5, 2 / 3),  # float32 0.9 = 0.89999998 still counts
        0.95: (1.0, 0.0, 0.0),  # nothing predicted: precision 1 by convention
    }
    for conf, (p, r, f1) in table.items():
        i = _at(c, conf)
        assert (c["precision"][0, i], c["recall"][0, i], c["f1"][0, i]) == pytest.approx((p, r, f1)), conf
        assert (c["precision_all"][i], c["recall_all"][i], c["f1_all"][i]) == pytest.approx((p, r, f1))
    assert c["best_f1"] == pytest.approx(0.8)
    assert c["best_conf"] == pytest.approx(0.3)  # the highest confidence that reaches the best F1
    assert (c["best_precision"], c["best_recall"]) == pytest.approx((2 / 3, 1.0))
    assert c["num_gt"].tolist() == [2] and c["num_pred"].tolist() == [3]


def test_confidence_curves_classes_duplicates_and_missing_gt() -> None:
    gt = [_gt([[0, 0, 10, 10]], [0]), _gt([[0, 0, 10, 10]], [1])]
    preds = [
        # on image 0's class-0 box: 0.8 TP, 0.7 duplicate (FP), class-1 0.9 (FP: wrong class)
        _pred(0, [[0, 0, 10, 10]] * 3, [0.8, 0.7, 0.9], [0, 0, 1]),
        _pred(1, [[0, 0, 10, 10]], [0.4], [2]),  # class 2 has no ground truth anywhere
    ]
    c = confidence_curves(gt, preds, num_classes=3)
    i = _at(c, 0.75)
    assert c["precision"][:2, i].tolist() == [1.0, 0.0] and c["recall"][:2, i].tolist() == [1.0, 0.0]
    assert c["f1_all"][i] == pytest.approx(0.5)  # mean over the classes with gt (0 and 1)
    i = _at(c, 0.5)
    assert c["precision"][0, i] == pytest.approx(0.5) and c["f1"][0, i] == pytest.approx(2 / 3)
    assert c["f1_all"][i] == pytest.approx(1 / 3)
    assert np.isnan(c["precision"][2]).all() and np.isnan(c["f1"][2]).all()
    assert c["best_f1"] == pytest.approx(0.5) and c["best_conf"] == pytest.approx(0.8)
    assert (c["best_precision"], c["best_recall"]) == pytest.approx((0.5, 0.5))
    assert c["num_gt"].tolist() == [1, 1, 0] and c["num_pred"].tolist() == [2, 1, 1]


def test_confidence_curves_iou_threshold_and_no_gt() -> None:
    gt = [_gt([_strip(0, 10)], [0])]
    preds = [_pred(0, [_strip(3, 13)], [0.9], [0])]  # IoU 7/13 = 0.54
    assert confidence_curves(gt, preds, 1, iou_thresh=0.5)["recall"][0, 0] == 1.0
    assert confidence_curves(gt, preds, 1, iou_thresh=0.6)["recall"][0, 0] == 0.0
    empty = confidence_curves([_gt(np.zeros((0, 4)), [])], [], 2, n_points=11)
    assert empty["conf"].shape == (11,) and np.isnan(empty["f1_all"]).all() and np.isnan(empty["best_f1"])


# ------------------------------------------------------------------------------------ pictures


def _random_case(num_classes: int, n_images: int = 30, seed: int = 0):
    rng = np.random.default_rng(seed)
    gt, preds = [], []
    for i in range(n_images):
        k = int(rng.integers(1, 5))
        xy = rng.uniform(0, 200, (k, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(20, 60, (k, 2))], 1)
        labels = rng.integers(0, num_classes, k)
        gt.append((boxes, labels))
        jitter = boxes + rng.normal(0, 3, boxes.shape)
        flip = rng.random(k) < 0.2
        plabels = np.where(flip, rng.integers(0, num_classes, k), labels)
        scores = np.clip(rng.normal(0.6, 0.2, k), 0.01, 0.99)
        preds.append(_pred(i, jitter.tolist(), scores.tolist(), plabels.tolist()))
    return gt, preds


def _not_blank(path) -> Image.Image:
    im = Image.open(path)
    im.load()
    arr = np.asarray(im.convert("RGB"))
    assert arr.std() > 10  # something drawn
    return im


@pytest.mark.parametrize("normalize", [True, False])
def test_plot_confusion_matrix(tmp_path, normalize: bool) -> None:
    gt, preds = _random_case(10)
    m = detection_confusion_matrix(gt, preds, 10)
    names = [f"class_{k}" for k in range(10)]
    path = viz.plot_confusion_matrix(m, names, tmp_path / "cm.png", normalize=normalize)
    im = _not_blank(path)
    assert im.format == "PNG" and min(im.size) >= 600
    big = viz.plot_confusion_matrix(np.eye(41, dtype=np.int64), None, tmp_path / "big.png")
    assert Image.open(big).size[0] > im.size[0]  # more classes, larger picture
    with pytest.raises(ValueError, match="class names"):
        viz.plot_confusion_matrix(m, names[:3], tmp_path / "bad.png")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


@pytest.mark.parametrize("kind", ["f1", "p", "r"])
def test_plot_confidence_curves(tmp_path, kind: str) -> None:
    gt, preds = _random_case(5)
    curves = confidence_curves(gt, preds, 5)
    im = _not_blank(viz.plot_confidence_curves(curves, tmp_path / f"{kind}.png", kind=kind))
    assert im.size == (600, 450)
    empty = confidence_curves([_gt(np.zeros((0, 4)), [])], [], 2)
    viz.plot_confidence_curves(empty, tmp_path / "empty.png", kind=kind)  # "no ground truth", no crash
    with pytest.raises(ValueError, match="kind"):
        viz.plot_confidence_curves(curves, tmp_path / "x.png", kind="map")


class _TinyDataset:
    """Dataset-like: ``len()`` and ``annotations(i)``, as ``DetectionDataset``."""

    def __init__(self, items):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def annotations(self, i: int):
        boxes, labels = self.items[i]
        return boxes.copy(), labels.copy()


def test_save_detection_plots(tmp_path) -> None:
    gt, preds = _random_case(3, n_images=8)
    out = tmp_path / "eval"
    paths = save_detection_plots(_TinyDataset(gt), preds, out, ["cat", "dog", "bird"])
    assert set(paths) == {"confusion_matrix", "f1_curve", "p_curve", "r_curve"}
    assert sorted(p.name for p in out.iterdir()) == ["confusion_matrix.png", "f1_curve.png", "p_curve.png",
                                                     "r_curve.png"]
    for p in paths.values():
        assert isinstance(p, str)
        _not_blank(p)
