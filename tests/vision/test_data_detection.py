"""COCO / YOLO / VOC loaders: auto-detection, round trips, bad input, transforms and collate."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import DataLoader

from vision.data import (
    DatasetError,
    build_detection_transforms,
    detection_collate,
    load_detection_dataset,
    make_digits,
    write_coco,
    write_voc,
    write_yolo,
)

FORMATS = ["coco", "yolo", "voc"]
WRITERS = {"coco": write_coco, "yolo": write_yolo, "voc": write_voc}
CLASSES = ["cat", "dog", "fox"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("digits")
    return {fmt: make_digits(root / fmt, fmt, n_train=6, n_val=3, img_size=96, seed=3) for fmt in FORMATS}


def _samples(n: int = 3, empty_last: bool = False) -> list:
    """Tiny hand-made samples: 64x48 images with known integer boxes."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        img = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
        boxes = np.array([[2, 3, 20, 30], [30, 10, 60, 40]], dtype=np.float32) + i
        labels = np.array([i % 3, (i + 1) % 3])
        if empty_last and i == n - 1:
            boxes, labels = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
        out.append((f"img_{i:03d}.jpg", img, boxes, labels))
    return out


def _tiny(tmp_path: Path, fmt: str, **kw) -> Path:
    root = tmp_path / fmt
    WRITERS[fmt](root, "train", _samples(**kw), CLASSES)
    return root


# ------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_autodetects_format(digits: dict[str, Path], fmt: str) -> None:
    ds = load_detection_dataset(digits[fmt], "train")
    assert ds.format == fmt and len(ds) == 6 and ds.bad == []
    assert ds.classes == [str(d) for d in range(10)]
    img, tgt = ds[0]
    assert img.shape == (3, 96, 96) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
    assert tgt["boxes"].dtype == torch.float32 and tgt["labels"].dtype == torch.int64
    assert tgt["image_id"] == 0 and tgt["orig_size"] == (96, 96) and Path(tgt["path"]).is_file()
    assert len(load_detection_dataset(digits[fmt], "val")) == 3
    coco = COCO()
    coco.dataset = ds.to_coco()
    coco.createIndex()
    assert sorted(coco.getImgIds()) == list(range(6))
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[0]))
    assert [a["category_id"] - 1 for a in anns] == tgt["labels"].tolist()
    assert "6 images" in ds.summary()


def test_formats_agree(digits: dict[str, Path]) -> None:
    for split in ("train", "val"):
        sets = [load_detection_dataset(digits[f], split) for f in FORMATS]
        for i in range(len(sets[0])):
            ref_boxes, ref_labels = sets[0].annotations(i)
            assert 1 <= len(ref_labels) <= 8
            for other in sets[1:]:
                boxes, labels = other.annotations(i)
                np.testing.assert_array_equal(labels, ref_labels)
                np.testing.assert_allclose(boxes, ref_boxes, atol=1.0)


def test_direct_file_paths(digits: dict[str, Path]) -> None:
    coco = load_detection_dataset(digits["coco"] / "annotations" / "instances_val.json", "val")
    yolo = load_detection_dataset(digits["yolo"] / "data.yaml", "val")
    assert (coco.format, len(coco)) == ("coco", 3) and (yolo.format, len(yolo)) == ("yolo", 3)


def test_unknown_layout(tmp_path: Path) -> None:
    (tmp_path / "stuff.txt").write_text("hello")
    with pytest.raises(DatasetError, match=r"no detection data set found") as info:
        load_detection_dataset(tmp_path)
    assert all(name in str(info.value) for name in ("COCO", "YOLO", "VOC", "LabelMe"))
    with pytest.raises(DatasetError, match="no such file"):
        load_detection_dataset(tmp_path / "nope")


# ------------------------------------------------------------------------------------------- bad input


def _yolo_label(root: Path, i: int = 1) -> Path:
    return root / "labels" / "train" / f"img_{i:03d}.txt"


def _edit_yolo(root: Path, line: str) -> tuple[str, str]:
    path = _yolo_label(root)
    path.write_text(path.read_text() + line + "\n")
    return str(path), rf"{re.escape(str(path))}:3"


def _edit_coco(
    root: Path, bbox: list[float] | None = None, category_id: int | None = None
) -> tuple[str, str]:
    path = root / "annotations" / "instances_train.json"
    data = json.loads(path.read_text())
    ann = data["annotations"][2]  # first box of the second image
    if bbox is not None:
        ann["bbox"] = bbox
    if category_id is not None:
        ann["category_id"] = category_id
    path.write_text(json.dumps(data))
    return str(path), rf"{re.escape(str(path))}: annotation #2"


def _edit_voc(root: Path, **values: str) -> tuple[str, str]:
    path = root / "Annotations" / "img_001.xml"
    text = path.read_text()
    for tag, v in values.items():
        text = re.sub(rf"<{tag}>[^<]*</{tag}>", f"<{tag}>{v}</{tag}>", text, count=1)
    path.write_text(text)
    return str(path), rf"{re.escape(str(path))}:\d+"


LABEL_CASES = [
    ("yolo", "malformed", lambda r: _edit_yolo(r, "1 0.5 0.5 0.2")),
    ("yolo", "malformed", lambda r: _edit_yolo(r, "1 0.5 abc 0.2 0.2")),
    ("yolo", "degenerate", lambda r: _edit_yolo(r, "1 0.5 0.5 0.0 0.2")),
    ("yolo", "unknown_class", lambda r: _edit_yolo(r, "7 0.5 0.5 0.2 0.2")),
    ("coco", "malformed", lambda r: _edit_coco(r, bbox=[1, 2, 3])),
    ("coco", "outside", lambda r: _edit_coco(r, bbox=[50, 10, 40, 10])),
    ("coco", "degenerate", lambda r: _edit_coco(r, bbox=[5, 5, 0, 10])),
    ("coco", "unknown_class", lambda r: _edit_coco(r, category_id=99)),
    ("voc", "malformed", lambda r: _edit_voc(r, xmin="abc")),
    ("voc", "outside", lambda r: _edit_voc(r, xmax="200")),
    ("voc", "degenerate", lambda r: _edit_voc(r, xmin="15", xmax="10")),
    ("voc", "unknown_class", lambda r: _edit_voc(r, name="zebra")),
]


def _image_of(root: Path, fmt: str, i: int = 1) -> Path:
    return root / ("JPEGImages" if fmt == "voc" else "images/train") / f"img_{i:03d}.jpg"


def _check_bad(root: Path, kind: str, pattern: str) -> None:
    with pytest.raises(DatasetError, match=pattern) as info:
        load_detection_dataset(root, "train")
    assert info.value.kind == kind
    ds = load_detection_dataset(root, "train", skip_bad=True)
    assert len(ds) == 2 and len(ds.bad) == 1 and re.search(pattern, ds.bad[0])
    assert "skipped 1 bad" in ds.summary()
    assert all("img_001" not in p.name for p in ds.image_paths)


@pytest.mark.parametrize(
    "fmt,kind,edit", LABEL_CASES, ids=[f"{f}-{k}-{i}" for i, (f, k, _) in enumerate(LABEL_CASES)]
)
def test_bad_labels(tmp_path: Path, fmt: str, kind: str, edit) -> None:
    root = _tiny(tmp_path, fmt)
    _, pattern = edit(root)
    _check_bad(root, kind, pattern)


def test_yolo_box_outside_drops_the_line_with_skip_bad(tmp_path: Path) -> None:
    root = _tiny(tmp_path, "yolo")
    _, pattern = _edit_yolo(root, "1 1.2 0.5 0.2 0.2")  # x from 1.1 to 1.3: beyond the image
    with pytest.raises(DatasetError, match=pattern) as info:
        load_detection_dataset(root, "train")
    assert info.value.kind == "outside"
    ds = load_detection_dataset(root, "train", skip_bad=True)
    assert len(ds) == 3 and len(ds.bad) == 1 and re.search(pattern, ds.bad[0])
    assert len(ds.annotations(1)[1]) == 2  # the image keeps its two good boxes, the third line is dropped


@pytest.mark.parametrize("fmt", FORMATS)
def test_corrupt_image(tmp_path: Path, fmt: str) -> None:
    root = _tiny(tmp_path, fmt)
    img = _image_of(root, fmt)
    img.write_bytes(b"this is not a jpeg at all" * 10)
    _check_bad(root, "bad_image", re.escape(str(img)))


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_image(tmp_path: Path, fmt: str) -> None:
    root = _tiny(tmp_path, fmt)
    if fmt == "yolo":  # image folders list what exists: a missing image needs a .txt image list
        (root / "train.txt").write_text("".join(f"./images/train/img_{i:03d}.jpg\n" for i in range(3)))
        (root / "data.yaml").write_text("train: train.txt\nval: train.txt\nnames: [cat, dog, fox]\n")
    _image_of(root, fmt).unlink()
    _check_bad(root, "missing_image", "img_001")


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_image_caught_by_the_validation_pass(tmp_path: Path, fmt: str) -> None:
    root = _tiny(tmp_path, fmt)
    img = _image_of(root, fmt)
    img.write_bytes(img.read_bytes()[:-400])  # header intact, pixel data cut: only a full decode sees it
    _check_bad(root, "bad_image", re.escape(str(img)) + ".*(truncated|cannot decode)")


def test_truncated_image_fails_in_getitem_with_file_name(tmp_path: Path) -> None:
    root = _tiny(tmp_path, "coco")
    img = _image_of(root, "coco")
    ds = load_detection_dataset(root)
    img.write_bytes(img.read_bytes()[:-400])  # damaged after the check (e.g. a copy still running)
    with pytest.raises(DatasetError, match=re.escape(str(img))):
        ds[1]


def test_box_within_tolerance_is_clipped(tmp_path: Path) -> None:
    root = _tiny(tmp_path, "yolo")
    _yolo_label(root).write_text("0 0.5 0.5 1.01 0.5\n")  # 0.32 px beyond each side of a 64 px image
    boxes, _ = load_detection_dataset(root).annotations(1)
    np.testing.assert_allclose(boxes[0, [0, 2]], [0, 64])


def test_coco_unknown_image_id_names_annotation(tmp_path: Path) -> None:
    root = _tiny(tmp_path, "coco")
    path = root / "annotations" / "instances_train.json"
    data = json.loads(path.read_text())
    data["annotations"][4]["image_id"] = 1234
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"annotation #4 \(id 5\): unknown image_id 1234"):
        load_detection_dataset(root)
    assert len(load_detection_dataset(root, skip_bad=True)) == 3


# ------------------------------------------------------------------------------------- format details


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_label_image_kept(tmp_path: Path, fmt: str) -> None:
    root = _tiny(tmp_path, fmt, empty_last=True)
    ds = load_detection_dataset(root)
    assert len(ds) == 3
    _, tgt = ds[2]
    assert tgt["boxes"].shape == (0, 4) and tgt["labels"].shape == (0,)


def test_voc_one_based_boxes_and_class_union(tmp_path: Path) -> None:
    root = _tiny(tmp_path, "voc")
    (root / "labels.txt").unlink()
    text = (root / "Annotations" / "img_000.xml").read_text()
    assert "<xmin>3</xmin>" in text  # x1 = 2 written 1-based
    ds = load_detection_dataset(root)
    assert ds.classes == sorted(CLASSES)
    boxes, _ = ds.annotations(0)
    np.testing.assert_array_equal(boxes[0], [2, 3, 20, 30])


def test_yolo_names_dict_and_missing_label_file(tmp_path: Path) -> None:
    root = _tiny(tmp_path, "yolo")
    (root / "data.yaml").write_text(
        "train: images/train\nval: images/train\nnames: {0: cat, 1: dog, 2: fox}\n"
    )
    _yolo_label(root).unlink()
    ds = load_detection_dataset(root, "val")
    assert ds.classes == CLASSES and ds.annotations(1)[0].shape == (0, 4)


def test_coco_json_next_to_images(tmp_path: Path) -> None:
    root = _tiny(tmp_path, "coco")
    json_path = root / "annotations" / "instances_train.json"
    moved = root / "images" / "train" / "gt.json"
    moved.write_text(json_path.read_text())
    assert len(load_detection_dataset(moved)) == 3


# ---------------------------------------------------------------------------------- transforms, collate


def test_transforms_keep_boxes_valid(digits: dict[str, Path]) -> None:
    assert build_detection_transforms(False) is None
    tf = build_detection_transforms(True, crop_size=64, scale=(0.6, 1.4))
    ds = load_detection_dataset(digits["coco"], transforms=tf)
    for _ in range(3):
        for i in range(len(ds)):
            img, tgt = ds[i]
            h, w = img.shape[1:]
            assert (h, w) == (64, 64) and 0 <= img.min() and img.max() <= 1
            boxes = tgt["boxes"]
            assert boxes.shape[0] == tgt["labels"].shape[0]
            if len(boxes):
                assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
                assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
                assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
                assert ((tgt["labels"] >= 0) & (tgt["labels"] < 10)).all()


def test_transforms_on_empty_image(tmp_path: Path) -> None:
    root = _tiny(tmp_path, "coco", empty_last=True)
    ds = load_detection_dataset(root, transforms=build_detection_transforms(True, crop_size=32))
    img, tgt = ds[2]
    assert img.shape == (3, 32, 32) and tgt["boxes"].shape == (0, 4)


def test_collate(digits: dict[str, Path]) -> None:
    ds = load_detection_dataset(digits["yolo"])
    images, targets = next(iter(DataLoader(ds, batch_size=4, collate_fn=detection_collate)))
    assert len(images) == len(targets) == 4
    assert [t["image_id"] for t in targets] == [0, 1, 2, 3]
    assert all(im.shape == (3, 96, 96) for im in images)


def test_large_scale_jitter_to_img_size(tmp_path):
    from vision.data import build_detection_transforms, load_detection_dataset
    from vision.data.digits import make_digits

    make_digits(tmp_path / "d", format="coco", n_train=4, n_val=1, img_size=160, seed=3)
    tf = build_detection_transforms(True, img_size=96, scale=(0.5, 1.5))
    ds = load_detection_dataset(tmp_path / "d", "train", transforms=tf)
    for i in range(len(ds)):
        img, t = ds[i]
        assert img.shape[-2:] == (96, 96)
        b = t["boxes"]
        assert len(b) == len(t["labels"])
        if len(b):
            assert (b[:, 0] >= 0).all() and (b[:, 2] <= 96).all() and (b[:, 2] > b[:, 0]).all()
