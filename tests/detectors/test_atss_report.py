"""The report section "what ATSS will do with these boxes" (detectors.atss.report) on generated digit folders."""

import base64
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from detectors.atss import ATSS, atss_assign, grid_anchors
from detectors.atss.model import STRIDES
from detectors.atss.report import (
    ATSSParams,
    DatasetBoxes,
    anchor_grid,
    assign_boxes,
    atss_assignment_section,
    dataset_boxes,
    holds_anchor_centre,
    letterbox_boxes,
    suggest_fix,
    zero_reasons,
)
from vision.data import load_detection_dataset, make_digits
from vision.data.report_sections import ReportContext, report_sections


def edit_coco_boxes(root: Path, split: str, edit) -> int:
    """Rewrite the COCO ``bbox`` of every annotation for which ``edit(index, bbox)`` returns a new [x, y, w, h];
    returns how many were changed."""
    path = root / "annotations" / f"instances_{split}.json"
    d = json.loads(path.read_text())
    changed = 0
    for k, a in enumerate(d["annotations"]):
        new = edit(k, a["bbox"])
        if new is not None:
            a["bbox"], a["area"] = [float(v) for v in new], float(new[2] * new[3])
            changed += 1
    path.write_text(json.dumps(d))
    return changed


def shrink_every(n: int, side: float, grid: float, offset: float):
    """An ``edit_coco_boxes`` rule: every n-th box becomes a ``side`` px square at ``grid`` * k + ``offset`` near its
    centre."""

    def edit(k, bbox):
        if k % n:
            return None
        x, y, w, h = bbox
        gx = math.floor((x + w / 2) / grid) * grid + offset
        gy = math.floor((y + h / 2) / grid) * grid + offset
        return [gx, gy, side, side]

    return edit


def context(ds, img_size: int, root: Path, **options) -> ReportContext:
    return ReportContext(data=root, format="coco", splits={"train": ds}, img_size=img_size, out=root / "report",
                         options={"progress": False, **options})


@pytest.fixture(scope="module")
def tiny_boxes(tmp_path_factory, one_thread):
    """12 digit images of 128 px with every 4th box a 2 px square at 4k + 0.5 (4 px at --img-size 256, between
    the P3 anchor centres)."""
    root = tmp_path_factory.mktemp("atss_report") / "digits"
    make_digits(root, format="coco", n_train=12, n_val=2, img_size=128, seed=0)
    assert edit_coco_boxes(root, "train", shrink_every(4, 2.0, 4.0, 0.5)) >= 5
    ds = load_detection_dataset(root, "train", progress=False)
    return root, ds


@pytest.fixture(scope="module")
def tiny_model():
    return ATSS(4, backbone="resnet18", fpn_channels=32, num_convs=1, min_size=256, max_size=256)


def direct_positives(ds, model: ATSS, side: int, ratio: float) -> list[np.ndarray]:
    """Positives per box, image by image: the model's own feature maps at a side x side input, its anchors, and
    atss_assign on the boxes scaled by ``ratio`` (exact in float32)."""
    with torch.no_grad():
        feats = model.fpn(model.backbone(torch.zeros(1, 3, side, side)))
    sizes = [(f.shape[-2], f.shape[-1]) for f in feats]
    anchors = grid_anchors(sizes, STRIDES, model.anchor_sizes)
    out = []
    for i in range(len(ds)):
        boxes, _ = ds.annotations(i)
        if len(boxes) == 0:
            continue
        gt = torch.from_numpy(boxes) * ratio
        assigned = atss_assign(anchors, [h * w for h, w in sizes], gt, topk=model.topk)
        out.append(torch.bincount(assigned[assigned >= 0], minlength=len(gt)).numpy())
    return out


def test_section_is_registered():
    assert "atss_assignment" in [name for name, _ in report_sections()]


def test_anchors_match_the_model_feature_maps(tiny_model):
    for img_size in (256, 200):  # 200: the canvas is the next multiple of 32 (224)
        side = int(math.ceil(img_size / 32) * 32)
        with torch.no_grad():
            feats = tiny_model.fpn(tiny_model.backbone(torch.zeros(1, 3, side, side)))
        sizes = [(f.shape[-2], f.shape[-1]) for f in feats]
        anchors, per_level = anchor_grid(img_size)
        assert per_level == [h * w for h, w in sizes]
        assert torch.equal(anchors, grid_anchors(sizes, STRIDES, tiny_model.anchor_sizes))


def test_letterbox_matches_the_model_transform(tiny_model):
    rng = np.random.default_rng(0)
    tiny_model.train()
    for w, h in ((100, 37), (37, 100), (640, 480), (333, 1000), (256, 256)):
        boxes = np.sort(rng.uniform(0, 1, (5, 2, 2)), axis=1).reshape(5, 4)[:, [0, 2, 1, 3]]
        boxes = (boxes * [w, h, w, h]).astype(np.float32)
        _, tg = tiny_model.transform([torch.rand(3, h, w)], [{"boxes": torch.from_numpy(boxes),
                                                                "labels": torch.zeros(5, dtype=torch.long)}])
        mine = letterbox_boxes(boxes, np.array([[w, h]]), np.zeros(5, dtype=np.int64), 256)
        assert torch.equal(mine, tg[0]["boxes"]), (w, h)


def test_zero_positive_boxes_match_a_direct_call_of_the_assigner(tiny_boxes, tiny_model):
    root, ds = tiny_boxes
    sec = atss_assignment_section(context(ds, 256, root))
    assert sec is not None and sec.title
    direct = np.concatenate(direct_positives(ds, tiny_model, 256, 2.0))
    data = dataset_boxes(ds)
    stats = assign_boxes(data, 256)
    assert np.array_equal(stats.num_pos, direct)  # per box, the same positives as the assigner called directly
    z = sec.figures["zero_positive"]
    assert z["count"] == int((direct == 0).sum()) > 0
    assert sec.figures["boxes"] == len(direct) == data.num_boxes
    assert sec.figures["positives_per_box"]["histogram"] == np.bincount(direct).tolist()
    # every planted 2 px box is reported, as small; the normal digit boxes get positives
    planted = (data.boxes[:, 2] - data.boxes[:, 0]) == 2.0
    assert (stats.num_pos[planted] == 0).all()
    assert z["by_reason"]["small"] >= int(planted.sum())
    normal = ~planted
    assert (stats.num_pos[normal] > 0).mean() > 0.9
    assert stats.level_counts[normal].sum() == stats.num_pos[normal].sum()
    assert sum(v["positives"] for v in sec.figures["levels"].values()) == int(direct.sum())
    assert sum(v["zero_positive"] for v in z["per_class"].values()) == z["count"]
    # the problem line, in the report's words
    n, b = z["count"], len(direct)
    assert sec.problems and sec.problems[0].startswith(
        f"{n} of {b} training boxes ({100 * n / b:.1f} %) get no positive anchor at --img-size 256")
    # the worst cases are the zero-positive boxes, with pictures
    worst = sec.figures["worst"]
    assert worst and all(w["positives"] == 0 for w in worst)
    assert worst[0]["size_at_img_size"] == [4.0, 4.0] and worst[0]["reason"] == "small"


def test_suggestion_is_the_smallest_tried_size_that_fixes_all(tiny_boxes):
    root, ds = tiny_boxes
    sec = atss_assignment_section(context(ds, 256, root))
    sug = sec.figures["suggestion"]
    tried = sug["tried"]
    assert tried and [t["img_size"] for t in tried] == sorted(t["img_size"] for t in tried)
    assert all(t["fixed"] < t["of"] for t in tried[:-1])
    if sug["img_size"] is not None:
        assert tried[-1]["fixed"] == tried[-1]["of"] and tried[-1]["img_size"] == sug["img_size"]
        assert f"--img-size {sug['img_size']}" in sec.problems[0]


def test_suggestion_finds_a_larger_img_size(tmp_path, one_thread):
    """6 px boxes at 8k + 1 hold no P3 anchor centre at --img-size 128; at 160 (x1.25) each holds one."""
    root = tmp_path / "one"
    make_digits(root, format="coco", n_train=6, n_val=1, img_size=128, seed=1, min_objects=1, max_objects=1)
    assert edit_coco_boxes(root, "train", shrink_every(2, 6.0, 8.0, 1.0)) == 3
    ds = load_detection_dataset(root, "train", progress=False)
    data = dataset_boxes(ds)
    stats = assign_boxes(data, 128)
    planted = (data.boxes[:, 2] - data.boxes[:, 0]) == 6.0
    assert (stats.num_pos[planted] == 0).all() and (stats.num_pos[~planted] > 0).all()
    fix = suggest_fix(data, stats)
    assert fix.img_size == 160 and fix.slice is None
    assert (assign_boxes(data, 160).num_pos > 0).all()
    sec = atss_assignment_section(context(ds, 128, root))
    assert sec.figures["suggestion"]["img_size"] == 160
    assert "--img-size 160 gives all 3 of them a positive anchor" in sec.problems[0]
    assert sec.figures["zero_positive"]["count"] == 3


def test_suggestion_falls_back_to_slicing():
    """A 2 px box needs x3: beyond the --img-size candidates (x1.25 .. x2), so a tiling is suggested."""
    data = DatasetBoxes(sizes=np.array([[128, 128]]), boxes=np.array([[1.5, 1.5, 3.5, 3.5]], np.float32),
                        labels=np.array([0]), image=np.array([0]), first=np.array([0, 1]), names=["a.jpg"],
                        classes=["x"])
    stats = assign_boxes(data, 128)
    assert stats.num_pos.tolist() == [0]
    fix = suggest_fix(data, stats)
    assert fix.img_size is None and fix.slice == round(128 * 128 / 384)
    assert [t["img_size"] for t in fix.tried] == [160, 192, 256, 384]
    assert f"--slice {fix.slice}" in fix.line(128)


def test_html_holds_only_data_images(tiny_boxes):
    root, ds = tiny_boxes
    sec = atss_assignment_section(context(ds, 256, root, thumbnails=4))
    srcs = re.findall(r'\bsrc="([^"]*)"', sec.html)
    assert len(srcs) == 1 + 4  # the plot and four thumbnails
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"https?://|href=|url\(", sec.html)
    from PIL import Image

    thumb = Image.open(io.BytesIO(base64.b64decode(srcs[1].split(",", 1)[1])))
    assert thumb.size == (160, 160)
    json.dumps(sec.figures)  # JSON-able


def test_none_without_boxes(tmp_path):
    root = tmp_path / "empty"
    make_digits(root, format="coco", n_train=3, n_val=1, img_size=64, seed=0)
    path = root / "annotations" / "instances_train.json"
    d = json.loads(path.read_text())
    d["annotations"] = []
    path.write_text(json.dumps(d))
    ds = load_detection_dataset(root, "train", progress=False)
    assert len(ds) == 3
    assert atss_assignment_section(context(ds, 128, root)) is None
    no_train = ReportContext(data=root, format="coco", splits={}, img_size=128, out=root)
    assert atss_assignment_section(no_train) is None
    defect_like = ReportContext(data=root, format="ksdd2", splits={"train": [1, 2, 3]}, img_size=128, out=root)
    assert atss_assignment_section(defect_like) is None


def test_zero_positive_reasons():
    """A box inside a near-identical larger one loses its anchors to it (overlap); a 3 px wide box between the
    anchor centres is thin, a 2 px one small; none of the three is a threshold miss."""
    boxes = np.array([[8, 8, 40, 40], [8.5, 8.5, 39.5, 39.5], [9, 20, 12, 80], [50, 50, 52, 52]], np.float32)
    data = DatasetBoxes(sizes=np.array([[128, 128], [128, 128]]), boxes=boxes, labels=np.zeros(4, np.int64),
                        image=np.array([0, 0, 1, 1]), first=np.array([0, 2, 4]), names=["a", "b"], classes=["x"])
    assert holds_anchor_centre(boxes).tolist() == [True, True, False, False]
    assert holds_anchor_centre(np.array([[7.995, 7.995, 9, 9], [7.98, 7.98, 9, 9]])).tolist() == [False, True]
    stats = assign_boxes(data, 128)
    assert stats.num_pos[0] > 0 and stats.num_pos[1:].tolist() == [0, 0, 0]
    assert zero_reasons(data, stats, np.array([1, 2, 3]), ATSSParams.from_model()) == ["overlap", "thin", "small"]
