"""Tests for vision.metrics.coco_evaluate against hand-computed COCO (101-point, interpolated) AP."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vision.metrics import coco_evaluate, format_ap_table


def _gt(boxes_per_image: dict[int, list[tuple[list[float], int]]], names=("cat", "dog")) -> dict:
    """COCO gt dict; boxes given as (xywh, 0-based label)."""
    anns = []
    for img_id, items in boxes_per_image.items():
        for bbox, label in items:
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": label + 1, "bbox": bbox,
                         "area": bbox[2] * bbox[3], "iscrowd": 0})
    return {"images": [{"id": i, "width": 200, "height": 200} for i in boxes_per_image],
            "categories": [{"id": k + 1, "name": n} for k, n in enumerate(names)], "annotations": anns}


def _pred(img_id: int, boxes, scores, labels) -> dict:
    return {"image_id": img_id, "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32), "labels": torch.tensor(labels, dtype=torch.long)}


GT2 = {1: [([10, 10, 50, 50], 0)], 2: [([100, 100, 50, 50], 0), ([20, 120, 60, 40], 1)]}


def test_perfect_predictions() -> None:
    preds = [_pred(1, [[10, 10, 60, 60]], [0.9], [0]),
             _pred(2, [[100, 100, 150, 150], [20, 120, 80, 160]], [0.8, 0.7], [0, 1])]
    r = coco_evaluate(_gt(GT2), preds)
    for k in ("AP", "AP50", "AP75", "APm", "AR1", "AR10", "AR100"):
        assert r[k] == pytest.approx(1.0), k
    assert math.isnan(r["APs"]) and math.isnan(r["APl"])   # no small / large gt -> nan, not -1
    assert set(r["per_class"]) == {"cat", "dog"} and all(v == pytest.approx(1.0) for v in r["per_class"].values())
    rec, prec = r["pr_curves"]["cat"]
    assert rec.shape == (101,) and prec.shape == (101,) and np.allclose(prec, 1.0)
    assert rec[0] == 0.0 and rec[-1] == 1.0


def test_one_tp_one_fp_hand_computed() -> None:
    # 2 gt of one class; TP (score .9, exact box) then FP (score .8): P=[1, .5], R=[.5, .5].
    # COCO samples the precision envelope at 101 recall points 0, .01, ..., 1: the 51 points r <= .5 get 1,
    # the 50 points above .5 get 0 -> AP = 51/101 at every IoU threshold.
    gt = _gt({1: [([10, 10, 50, 50], 0)], 2: [([100, 100, 50, 50], 0)]}, names=("cat",))
    preds = [_pred(1, [[10, 10, 60, 60], [120, 10, 170, 60]], [0.9, 0.8], [0, 0]), _pred(2, [], [], [])]
    r = coco_evaluate(gt, preds)
    assert r["AP50"] == pytest.approx(51 / 101) and r["AP"] == pytest.approx(51 / 101)
    assert r["AR100"] == pytest.approx(0.5)
    prec = r["pr_curves"]["cat"][1]
    assert np.allclose(prec[:51], 1.0) and np.allclose(prec[51:], 0.0)
    # Same boxes, FP ranked first: P=[0, .5], R=[0, .5]; envelope .5 up to recall .5 -> AP = 51 * .5 / 101.
    preds[0]["scores"] = torch.tensor([0.8, 0.9])
    assert coco_evaluate(gt, preds)["AP50"] == pytest.approx(51 * 0.5 / 101)


def test_fp_on_image_without_gt() -> None:
    # Image 2 has no gt; its detection (score .95) is an FP ranked above the TP: P=[0, .5], R=[0, 1] -> AP .5.
    gt = _gt({1: [([10, 10, 50, 50], 0)], 2: []}, names=("cat",))
    preds = [_pred(1, [[10, 10, 60, 60]], [0.9], [0]), _pred(2, [[0, 0, 30, 30]], [0.95], [0])]
    assert coco_evaluate(gt, preds)["AP50"] == pytest.approx(0.5)


def test_no_predictions_and_class_without_gt() -> None:
    gt = _gt({1: [([10, 10, 50, 50], 0)], 2: []})        # "dog" has no gt at all
    r = coco_evaluate(gt, [])
    assert r["AP"] == 0.0 and r["AP50"] == 0.0 and r["AR100"] == 0.0
    assert r["per_class"]["cat"] == 0.0 and math.isnan(r["per_class"]["dog"])
    preds = [_pred(1, [[10, 10, 60, 60]], [0.9], [0])]
    r = coco_evaluate(gt, preds, class_names=["cat", "dog", "bird"])
    assert list(r["per_class"]) == ["cat", "dog", "bird"]
    assert r["per_class"]["cat"] == pytest.approx(1.0) and math.isnan(r["per_class"]["bird"])
    assert r["AP"] == pytest.approx(1.0)                  # classes without gt are skipped in the mean
    assert np.isnan(r["pr_curves"]["dog"][1]).all()


def test_gt_without_ids_and_bad_image_id() -> None:
    gt = _gt({1: [([10, 10, 50, 50], 0)]})
    for a in gt["annotations"]:
        del a["id"], a["area"], a["iscrowd"]
    assert coco_evaluate(gt, [_pred(1, [[10, 10, 60, 60]], [0.9], [0])])["AP"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="image_id 7"):
        coco_evaluate(gt, [_pred(7, [[10, 10, 60, 60]], [0.9], [0])])


def test_segm_perfect_masks() -> None:
    from pycocotools import mask as mask_utils

    m = np.zeros((40, 40), np.uint8)
    m[5:25, 8:30] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode("ascii")
    gt = {"images": [{"id": 1, "width": 40, "height": 40}], "categories": [{"id": 1, "name": "defect"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": rle, "area": float(m.sum()),
                           "bbox": [8, 5, 22, 20], "iscrowd": 0}]}
    pred = {"image_id": 1, "masks": torch.from_numpy(m)[None, None].float(), "scores": torch.tensor([0.7]),
            "labels": torch.tensor([0])}
    assert coco_evaluate(gt, [pred], iou_type="segm")["AP"] == pytest.approx(1.0)


def test_format_ap_table() -> None:
    r = coco_evaluate(_gt({1: [([10, 10, 50, 50], 0)]}), [_pred(1, [[10, 10, 60, 60]], [0.9], [0])])
    text = format_ap_table(r)
    assert "AP50" in text and "cat" in text and "dog" in text and "100.0" in text
