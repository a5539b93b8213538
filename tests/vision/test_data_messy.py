"""Messy real-world folders: every kind of bad input has a generated case, a message naming the file and a
--skip-bad policy; the validation pass (full decode, cache), EXIF orientation, LabelMe, umask, output names."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vision.data import (
    DatasetError,
    SplitNotFoundError,
    load_detection_dataset,
    write_coco,
    write_labelme,
    write_voc,
    write_yolo,
)
from vision.data.formats import get_format, list_formats
from vision.data.validate import CACHE_NAME, ImageChecker
from vision.io import make_temp_dir, output_names, write_json_atomic
from vision.registry import RegistryError

WRITERS = {"coco": write_coco, "yolo": write_yolo, "voc": write_voc, "labelme": write_labelme}
CLASSES = ["cat", "dog", "fox"]


def _samples(n: int = 3, shift: int = 0) -> list:
    rng = np.random.default_rng(shift)
    out = []
    for i in range(n):
        img = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
        boxes = np.array([[2, 3, 20, 30], [30, 10, 60, 40]], dtype=np.float32) + i
        out.append((f"img_{i + shift:03d}.jpg", img, boxes, np.array([i % 3, (i + 1) % 3])))
    return out


def _tiny(tmp_path: Path, fmt: str, n: int = 3) -> Path:
    root = tmp_path / fmt
    WRITERS[fmt](root, "train", _samples(n), CLASSES)
    return root


def _raises(root: Path, kind: str, pattern: str, split: str = "train") -> DatasetError:
    with pytest.raises(DatasetError, match=pattern) as info:
        load_detection_dataset(root, split)
    assert info.value.kind == kind, str(info.value)
    return info.value


# ------------------------------------------------------------------------------------------- registry


def test_formats_registry_lists_every_format():
    assert [f.name for f in list_formats("detection")] == ["yolo", "voc", "coco", "labelme"]
    assert {f.name for f in list_formats("defect")} == {"ksdd", "ksdd2", "dagm", "severstal", "folder"}
    with pytest.raises(RegistryError, match="Did you mean: labelme"):
        get_format("lablme")
    assert all(f.write is not None for f in list_formats("detection"))


# -------------------------------------------------------------------------------------------- images


@pytest.mark.parametrize("fmt", ["coco", "yolo", "voc", "labelme"])
def test_zero_byte_and_non_image_files(tmp_path: Path, fmt: str) -> None:
    root = _tiny(tmp_path, fmt)
    imgs = sorted(p for p in root.rglob("img_*.jpg"))
    imgs[0].write_bytes(b"")
    imgs[1].write_text("<html>not an image</html>")
    err = _raises(root, "bad_image", "2 problems")
    assert re.search(re.escape(str(imgs[0])) + r": empty file \(0 bytes\)", str(err))
    assert re.search(re.escape(str(imgs[1])) + r": not an image file", str(err))
    ds = load_detection_dataset(root, skip_bad=True)
    assert len(ds) == 1 and len(ds.bad) == 2 and "2 unreadable image" in ds.summary()


def test_many_problems_listed_up_to_twenty(tmp_path: Path) -> None:
    root = tmp_path / "yolo"
    write_yolo(root, "train", _samples(25), CLASSES)
    for p in sorted((root / "images" / "train").glob("*.jpg")):
        p.write_bytes(b"garbage")
    err = _raises(root, "bad_image", "25 problems in split 'train'")
    text = str(err)
    assert text.count("not an image file") == 20 and "... and 5 more" in text and "--skip-bad" in text
    assert len(err.problems) == 25


def test_cache_makes_the_second_start_a_lookup(tmp_path: Path) -> None:
    root = _tiny(tmp_path, "yolo")
    ck = ImageChecker(root)
    files = sorted((root / "images" / "train").glob("*.jpg"))
    ck.prefetch(files)
    assert ck.checked == 3 and ck.cached == 0 and (root / CACHE_NAME).is_file()
    again = ImageChecker(root)
    again.prefetch(files)
    assert again.checked == 0 and again.cached == 3
    # a file that changes (size / mtime) is decoded again: a copy truncated after the first check is caught
    data = files[1].read_bytes()
    files[1].write_bytes(data[:-300])
    os.utime(files[1], ns=(1, 1))
    third = ImageChecker(root)
    third.prefetch(files)
    assert third.checked == 1 and third.cached == 2 and third.info(files[1]).kind == "bad_image"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_data_folder_uses_the_user_cache(tmp_path: Path, monkeypatch) -> None:
    root = _tiny(tmp_path, "yolo")
    monkeypatch.setenv("NEGVISION_CACHE_DIR", str(tmp_path / "cache"))
    for d in [root, *root.rglob("*")]:
        if d.is_dir():
            d.chmod(0o555)
    try:
        assert len(load_detection_dataset(root)) == 3
        assert not (root / CACHE_NAME).exists() and list((tmp_path / "cache" / "index").glob("*.json"))
    finally:
        for d in [root, *root.rglob("*")]:
            if d.is_dir():
                d.chmod(0o755)


def test_not_writable_data_folder_uses_the_user_cache(tmp_path: Path, monkeypatch) -> None:
    """Same as above for a machine where the tests run as root: os.access says the folder is not writable."""
    root = _tiny(tmp_path, "yolo")
    monkeypatch.setenv("NEGVISION_CACHE_DIR", str(tmp_path / "cache"))
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if Path(p) == root.resolve() else real(p, m))
    assert len(load_detection_dataset(root)) == 3
    assert not (root / CACHE_NAME).exists() and len(list((tmp_path / "cache" / "index").glob("*.json"))) == 1
    assert ImageChecker(root).cache_paths()[1].is_file()


# ---------------------------------------------------------------------------------------------- EXIF


def _exif_jpeg(path: Path, arr: np.ndarray, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(path, quality=98, exif=exif.tobytes())


def test_exif_rotated_photo_equals_the_physically_rotated_one(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)  # as the sensor wrote it: 60 wide, 40 high
    stored = np.kron(stored[::4, ::4], np.ones((4, 4, 1), np.uint8))[:40, :60]  # smooth: JPEG keeps it
    shown = np.rot90(stored, k=-1).copy()  # orientation 6 = rotate 90 degrees clockwise to display: 40 x 60
    a, b = tmp_path / "a", tmp_path / "b"
    box = np.array([[5, 30, 25, 55]], np.float32)  # in the displayed (40 wide, 60 high) picture
    write_coco(a, "train", [("p.jpg", Image.fromarray(shown), box, np.array([0]))], ["x"])
    write_coco(b, "train", [("p.jpg", Image.fromarray(shown), box, np.array([0]))], ["x"])
    _exif_jpeg(a / "images" / "train" / "p.jpg", stored, 6)  # the phone photo: stored sideways + tag
    Image.fromarray(shown).save(b / "images" / "train" / "p.jpg", quality=98)  # the rotated copy
    da, db = load_detection_dataset(a), load_detection_dataset(b)
    ia, ta = da[0]
    ib, tb = db[0]
    assert ia.shape == ib.shape == (3, 60, 40) and ta["orig_size"] == (60, 40)
    assert float((ia - ib).abs().mean()) < 0.02  # same picture up to JPEG noise
    np.testing.assert_array_equal(ta["boxes"].numpy(), tb["boxes"].numpy())
    # a box valid only in the displayed orientation (y up to 55 > the stored height 40) is accepted
    assert ta["boxes"][0, 3] == 55


# --------------------------------------------------------------------------------------------- COCO


def _coco(root: Path) -> tuple[Path, dict]:
    path = root / "annotations" / "instances_train.json"
    return path, json.loads(path.read_text())


def test_coco_duplicate_image_id(tmp_path: Path) -> None:
    root = _tiny(tmp_path, "coco")
    path, data = _coco(root)
    data["images"][2]["id"] = data["images"][1]["id"]
    path.write_text(json.dumps(data))
    _raises(root, "duplicate_id", re.escape(str(path)) + r": images\[2\] \('img_002.jpg'\): duplicate image id 2")
    ds = load_detection_dataset(root, skip_bad=True)
    assert [p.name for p in ds.image_paths] == ["img_000.jpg"]  # both images sharing the id are dropped


def test_coco_one_file_listed_under_two_ids(tmp_path: Path) -> None:
    root = _tiny(tmp_path, "coco")
    path, data = _coco(root)
    data["images"].append({**data["images"][1], "id": 99})  # a merge of two exports listed img_001 twice
    data["annotations"].append({**data["annotations"][0], "id": 999, "image_id": 99})
    path.write_text(json.dumps(data))
    _raises(root, "duplicate_file", re.escape(str(path)) + r": image 'img_001.jpg' is listed 2 times \(ids 2, 99\)")
    ds = load_detection_dataset(root, skip_bad=True)
    assert sorted(p.name for p in ds.image_paths) == ["img_000.jpg", "img_002.jpg"]  # every entry of it dropped


@pytest.mark.parametrize("bad_id", [[1], None, True, {"a": 1}])
def test_coco_ids_of_the_wrong_type(tmp_path: Path, bad_id) -> None:
    root = _tiny(tmp_path, "coco")
    path, data = _coco(root)
    data["images"][0]["id"] = bad_id
    path.write_text(json.dumps(data))
    err = _raises(root, "bad_id", re.escape(str(path)) + r": images\[0\] \('img_000.jpg'\): id .* must be an integer")
    assert "annotation #0" in str(err)  # its annotations now point nowhere and are reported too
    data["images"][0]["id"] = 1
    data["annotations"][0]["image_id"] = [1]
    path.write_text(json.dumps(data))
    _raises(root, "bad_id", r"annotation #0: image_id \[1\] is not an image id")


def test_coco_string_and_float_ids_stay_valid(tmp_path: Path) -> None:
    root = _tiny(tmp_path, "coco")
    path, data = _coco(root)
    for img in data["images"]:
        img["id"] = f"im{img['id']}"
    for ann in data["annotations"]:
        ann["image_id"] = f"im{ann['image_id']}"
        ann["category_id"] = float(ann["category_id"])
    path.write_text(json.dumps(data))
    ds = load_detection_dataset(root)
    assert len(ds) == 3 and len(ds.annotations(0)[1]) == 2


def test_coco_val_split_with_fewer_classes_keeps_the_declared_list(tmp_path: Path) -> None:
    root = _tiny(tmp_path, "coco")
    only_cats = [(n, im, b[:1], lab[:1] * 0) for n, im, b, lab in _samples(2, shift=10)]  # every box a cat
    write_coco(root, "val", only_cats, CLASSES)
    assert load_detection_dataset(root, "val").classes == CLASSES


# ---------------------------------------------------------------------------------------------- VOC


def test_voc_val_split_lacking_a_class_gets_the_union(tmp_path: Path) -> None:
    root = _tiny(tmp_path, "voc")
    (root / "labels.txt").unlink()
    only_cats = [(n, im, b[:1], lab[:1] * 0) for n, im, b, lab in _samples(2, shift=10)]
    write_voc(root, "val", only_cats, CLASSES)
    (root / "labels.txt").unlink()
    train, val = load_detection_dataset(root, "train"), load_detection_dataset(root, "val")
    assert train.classes == val.classes == CLASSES


def test_voc_missing_xml_missing_image_and_malformed_xml(tmp_path: Path) -> None:
    root = _tiny(tmp_path, "voc")
    xml = root / "Annotations" / "img_001.xml"
    xml.unlink()
    _raises(root, "missing_annotation", re.escape(str(xml)) + r": annotation file not found \(id 'img_001' is listed")
    assert len(load_detection_dataset(root, skip_bad=True)) == 2
    root = _tiny(tmp_path / "b", "voc")
    (root / "JPEGImages" / "img_002.jpg").unlink()
    _raises(root, "missing_image", re.escape(str(root / "JPEGImages" / "img_002.jpg")) + ": image not found")
    root = _tiny(tmp_path / "c", "voc")
    (root / "Annotations" / "img_000.xml").write_text("<annotation><object><name>cat</name>")
    _raises(root, "malformed", re.escape(str(root / "Annotations" / "img_000.xml")) + r":1: invalid XML")


def test_absent_split_is_not_an_error_of_the_data(tmp_path: Path) -> None:
    for fmt in WRITERS:
        root = _tiny(tmp_path, fmt)
        if fmt == "yolo":
            (root / "data.yaml").write_text("train: images/train\nnames: [cat, dog, fox]\n")
        with pytest.raises(SplitNotFoundError):
            load_detection_dataset(root, "val")


# --------------------------------------------------------------------------------------------- YOLO


def test_yolo_two_images_one_label_file_warn_and_load(tmp_path: Path, caplog) -> None:
    import logging

    root = _tiny(tmp_path, "yolo")
    jpg = sorted((root / "images" / "train").iterdir())[0]
    Image.open(jpg).save(jpg.with_suffix(".png"))  # the same picture left over from a conversion
    with caplog.at_level(logging.WARNING, logger="negvision.data"):
        ds = load_detection_dataset(root)
    assert len(ds) == 4  # as ultralytics: both take the label file
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert f"labels/train/{jpg.stem}.txt is the label file of 2 images" in msg and jpg.with_suffix(".png").name in msg


def test_yolo_non_utf8_files_name_the_file(tmp_path: Path) -> None:
    root = _tiny(tmp_path, "yolo")
    lst = root / "train.txt"
    lst.write_bytes("./images/train/img_000.jpg\n./images/train/caf\xe9.jpg\n".encode("latin-1"))
    (root / "data.yaml").write_text("train: train.txt\nval: train.txt\nnames: [cat, dog, fox]\n")
    _raises(root, "dataset", re.escape(str(lst)) + ": image list is not UTF-8 text")
    root = _tiny(tmp_path / "b", "yolo")
    label = root / "labels" / "train" / "img_001.txt"
    label.write_bytes(b"0 0.5 0.5 0.2 0.2 \xff\xfe\n")
    _raises(root, "malformed", re.escape(str(label)) + ": label file is not UTF-8")


def test_yolo_non_integer_class_and_field_count(tmp_path: Path) -> None:
    root = _tiny(tmp_path, "yolo")
    label = root / "labels" / "train" / "img_001.txt"
    label.write_text("1.5 0.5 0.5 0.2 0.2\n")
    _raises(root, "malformed", re.escape(str(label)) + r":1: class id '1.5' is not an integer")
    label.write_text("1 0.5 0.5 0.2 0.2 0.9\n")
    _raises(root, "malformed", re.escape(str(label)) + r":1: expected 5 fields")


def test_box_wholly_outside_the_image(tmp_path: Path) -> None:
    root = _tiny(tmp_path, "coco")
    path, data = _coco(root)
    data["annotations"][0]["bbox"] = [100, 100, 10, 10]
    path.write_text(json.dumps(data))
    _raises(root, "outside", r"annotation #0 .*lies wholly outside the 64x48 image")


# ------------------------------------------------------------------------------------------- LabelMe


def test_labelme_round_trip_agrees_with_coco(tmp_path: Path) -> None:
    lm, coco = _tiny(tmp_path, "labelme"), _tiny(tmp_path, "coco")
    a, b = load_detection_dataset(lm), load_detection_dataset(coco)
    assert a.format == "labelme" and a.classes == CLASSES and len(a) == 3
    for i in range(3):
        np.testing.assert_allclose(a.annotations(i)[0], b.annotations(i)[0], atol=1e-3)
        np.testing.assert_array_equal(a.annotations(i)[1], b.annotations(i)[1])


def test_labelme_polygons_circles_and_bad_shapes(tmp_path: Path) -> None:
    root = tmp_path / "lm"
    root.mkdir()
    Image.fromarray(np.zeros((50, 80, 3), np.uint8)).save(root / "x.jpg")
    shapes = [
        {"label": "cat", "points": [[10, 5], [30, 8], [20, 25]], "shape_type": "polygon"},
        {"label": "dog", "points": [[40, 20], [45, 20]], "shape_type": "circle"},
        {"label": "dog", "points": [[1, 1]], "shape_type": "point"},  # no area: ignored
        {"label": "cat", "points": [[60, 40], [50, 30]], "shape_type": "rectangle"},  # corners in any order
    ]
    doc = {"shapes": shapes, "imagePath": "x.jpg", "imageHeight": 50, "imageWidth": 80}
    (root / "x.json").write_text(json.dumps(doc))
    ds = load_detection_dataset(root)
    assert ds.format == "labelme" and ds.classes == ["cat", "dog"]
    boxes, labels = ds.annotations(0)
    np.testing.assert_allclose(boxes, [[10, 5, 30, 25], [35, 15, 45, 25], [50, 30, 60, 40]])
    assert labels.tolist() == [0, 1, 0]
    with pytest.raises(SplitNotFoundError):
        load_detection_dataset(root, "val")
    shapes.append({"label": "cat", "points": [[1, 2]], "shape_type": "rectangle"})
    (root / "x.json").write_text(json.dumps(doc))
    _raises(root, "malformed", re.escape(str(root / "x.json")) + r": shapes\[4\]: a rectangle needs at least 2 points")
    (root / "labels.txt").write_text("__ignore__\ncat\n")
    shapes.pop()
    (root / "x.json").write_text(json.dumps(doc))
    _raises(root, "unknown_class", r"shapes\[1\]: unknown class 'dog' \(not in labels.txt\)")


def test_labelme_missing_image_and_bad_json(tmp_path: Path) -> None:
    root = _tiny(tmp_path, "labelme")
    (root / "train" / "img_001.jpg").unlink()
    _raises(root, "missing_image", "img_001.jpg: image not found")
    (root / "train" / "img_002.json").write_text("{not json")
    ds = load_detection_dataset(root, skip_bad=True)
    assert len(ds) == 1 and len(ds.bad) == 2


# ------------------------------------------------------------------------------------ files and names


def test_files_and_temp_dirs_honour_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
        d = make_temp_dir(tmp_path, "t")
        assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
        assert stat.S_IMODE(d.stat().st_mode) == 0o755
        os.umask(0o027)
        write_json_atomic(tmp_path / "b.json", {"x": 1})
        assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o640
    finally:
        os.umask(old)


def test_output_names_never_collide(tmp_path: Path) -> None:
    files = [tmp_path / "a.jpg", tmp_path / "a.png", tmp_path / "sub" / "a.jpg", tmp_path / "b.jpg"]
    names = output_names(files, tmp_path)
    assert [n.as_posix() for n in names] == ["a.jpg", "a.png", "sub/a", "b"]
    listed = output_names([tmp_path / "x" / "a.jpg", tmp_path / "y" / "a.jpg", tmp_path / "c.png"])
    assert [n.as_posix() for n in listed] == ["x/a", "y/a", "c"]
    assert len(set(output_names([tmp_path / "a.jpg", tmp_path / "a.jpg"]))) == 2
