"""Defect data: each layout's reader on generated folders, auto-detection, bad input, and the sample generator."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detectors.segdec import (
    DatasetError,
    MaskTargets,
    detect_layout,
    load_defect_dataset,
    parse_img_size,
    rle_decode,
)
from vision.data.defects import make_defects


def _img(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _texture(h: int, w: int, seed: int, rgb: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, size=(h, w, 3) if rgb else (h, w), dtype=np.uint8)


def _mask(h: int, w: int, box: tuple[int, int, int, int] | None, value: int = 255) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    if box is not None:
        y0, y1, x0, x1 = box
        m[y0:y1, x0:x1] = value
    return m


# ----------------------------------------------------------------------------------------------- generator


def test_make_defects_layout_deterministic_and_prefix_stable(tmp_path):
    a = make_defects(tmp_path / "a", n_train=10, n_test=4, img_size=32, seed=3)
    b = make_defects(tmp_path / "b", n_train=6, n_test=2, img_size=32, seed=3)
    rows = list(csv.DictReader(open(a / "train" / "labels.csv")))
    assert len(rows) == 10 and {"image", "label", "segmented", "texture", "defect"} <= set(rows[0])
    assert 1 <= sum(int(r["label"]) for r in rows) < 10
    for r in rows:
        img = np.asarray(Image.open(a / "train" / "images" / r["image"]))
        assert img.shape == (32, 32) and img.dtype == np.uint8
        mask_file = a / "train" / "masks" / r["image"]
        assert mask_file.is_file() == (r["label"] == "1")
        if mask_file.is_file():
            m = np.asarray(Image.open(mask_file))
            assert set(np.unique(m).tolist()) == {0, 255}
    for name in ("train_0000.png", "train_0005.png"):  # sample i does not depend on the set size
        assert (a / "train" / "images" / name).read_bytes() == (b / "train" / "images" / name).read_bytes()
    c = make_defects(tmp_path / "c", n_train=6, n_test=0, img_size=32, seed=4)
    assert (c / "train" / "images" / "train_0001.png").read_bytes() != (b / "train" / "images" / "train_0001.png").read_bytes()
    with pytest.raises(ValueError, match="multiple of 8"):
        make_defects(tmp_path / "d", img_size=36)
    with pytest.raises(ValueError):
        make_defects(tmp_path / "d", defect_fraction=1.5)


def test_folder_layout_with_image_level_labels(tmp_path):
    root = make_defects(tmp_path / "set", n_train=20, n_test=6, img_size=32, seed=0, image_level_fraction=0.5)
    assert detect_layout(root) == "folder"
    ds = load_defect_dataset(root, "train")
    rows = {r["image"][:-4]: r for r in csv.DictReader(open(root / "train" / "labels.csv"))}
    assert ds.img_size == (32, 32) and ds.channels == 1 and len(ds) == 20
    for s in ds.samples:
        assert s.label == int(rows[s.name]["label"])
        assert s.segmented == (rows[s.name]["segmented"] == "1")
    assert any(not s.segmented for s in ds.samples)  # some are image-level only
    item = ds[0]
    assert item["image"].shape == (1, 32, 32) and item["seg_target"].shape == (1, 4, 4)
    assert item["seg_weight"].shape == (1, 4, 4) and item["label"].dtype == torch.float32
    # a positive with a mask used for training has a non-empty soft target and distance weights > 1
    i = next(i for i, s in enumerate(ds.samples) if s.label == 1 and s.segmented)
    it = ds[i]
    assert bool(it["segmented"]) and float(it["seg_target"].max()) > 0
    # num_segmented keeps masks of exactly N defective images
    ds1 = load_defect_dataset(root, "train", targets=MaskTargets(num_segmented=1, seed=0))
    assert sum(1 for s in ds1.samples if s.label == 1 and s.segmented) == 1
    ds0 = load_defect_dataset(root, "train", targets=MaskTargets(num_segmented=0))
    assert not any(s.segmented for s in ds0.samples if s.label == 1)
    assert all(s.segmented for s in ds0.samples if s.label == 0)
    test = load_defect_dataset(root, "test", img_size="16x24")
    assert len(test) == 6 and test[0]["image"].shape == (1, 24, 16)
    assert test.full_mask(0).shape == (32, 32)


def test_ksdd_layout(tmp_path):
    root = tmp_path / "KolektorSDD"
    for k in range(1, 5):
        for part in range(2):
            stem = root / f"kos{k:02d}" / f"Part{part}"
            _img(stem.with_suffix(".jpg"), _texture(40, 16, k * 10 + part))
            _img(stem.parent / f"Part{part}_label.bmp", _mask(40, 16, (5, 12, 4, 9) if part == 1 else None))
    assert detect_layout(root) == "ksdd"
    train = load_defect_dataset(root, "train", img_size="16x40")
    test = load_defect_dataset(root, "test", img_size="16x40")
    assert sorted(s.name for s in test.samples) == ["kos01_Part0", "kos01_Part1", "kos04_Part0", "kos04_Part1"]
    assert len(train) == 4 and train.labels.count(1) == 2
    assert train[0]["image"].shape == (1, 40, 16) and train[0]["seg_target"].shape == (1, 5, 2)
    other = load_defect_dataset(root, "test", "ksdd", img_size="16x40", fold=1)
    assert {s.name[:5] for s in other.samples} == {"kos02"}


def test_ksdd2_layout_rgb(tmp_path):
    root = tmp_path / "KSDD2"
    for split, n in (("train", 3), ("test", 2)):
        for i in range(n):
            _img(root / split / f"{10000 + i}.png", _texture(24, 16, i, rgb=True))
            _img(root / split / f"{10000 + i}_GT.png", _mask(24, 16, (2, 6, 2, 6) if i == 0 else None))
    assert detect_layout(root) == "ksdd2"
    ds = load_defect_dataset(root, "train")
    assert ds.channels == 3 and ds.img_size == (24, 16) and ds.labels == [1, 0, 0]
    assert ds[1]["image"].shape == (3, 24, 16)
    assert len(load_defect_dataset(root, "test")) == 2


def test_dagm_layout(tmp_path):
    root = tmp_path / "DAGM"
    for c in (1, 2):
        for sub in ("Train", "Test"):
            for i in range(3):
                _img(root / f"Class{c}" / sub / f"{i:04d}.PNG", _texture(32, 32, c * 100 + i))
            _img(root / f"Class{c}" / sub / "Label" / "0001_label.PNG", _mask(32, 32, (8, 16, 8, 20)))
    assert detect_layout(root) == "dagm"
    ds = load_defect_dataset(root, "train")
    assert len(ds) == 6 and ds.labels.count(1) == 2
    one = load_defect_dataset(root, "test", dagm_class=2)
    assert len(one) == 3 and one.labels == [0, 1, 0] and one.samples[1].name.startswith("Class2")
    assert detect_layout(root / "Class1") == "dagm"
    assert len(load_defect_dataset(root / "Class1", "train")) == 3


def test_rle_decode_is_column_major_one_based():
    m = rle_decode([1, 3, 7, 2], height=4, width=2)
    expected = np.zeros((4, 2), bool)
    expected[0:3, 0] = True  # pixels 1..3 run down the first column
    expected[2:4, 1] = True  # pixels 7..8 = rows 2..3 of the second column
    np.testing.assert_array_equal(m, expected)
    with pytest.raises(DatasetError, match="outside"):
        rle_decode([7, 5], 4, 2)


@pytest.mark.parametrize("old_format", [False, True])
def test_severstal_layout_merges_classes(tmp_path, old_format):
    root = tmp_path / "severstal"
    names = [f"{i:03d}abc.jpg" for i in range(10)]
    for i, n in enumerate(names):
        _img(root / "train_images" / n, _texture(8, 16, i))
    with open(root / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        if old_format:
            w.writerow(["ImageId_ClassId", "EncodedPixels"])
            for n in names:
                for c in (1, 2, 3, 4):
                    enc = {(names[0], 1): "1 4", (names[0], 3): "17 2", (names[1], 2): "5 3"}.get((n, c), "")
                    w.writerow([f"{n}_{c}", enc])
        else:
            w.writerow(["ImageId", "ClassId", "EncodedPixels"])
            w.writerows([[names[0], 1, "1 4"], [names[0], 3, "17 2"], [names[1], 2, "5 3"]])
    assert detect_layout(root) == "severstal"
    train, test = load_defect_dataset(root, "train"), load_defect_dataset(root, "test")
    assert sorted(s.name for s in train.samples + test.samples) == sorted(n[:-4] for n in names)
    assert sum(train.labels) + sum(test.labels) == 2
    ds = train if any(s.name == names[0][:-4] for s in train.samples) else test
    i = next(i for i, s in enumerate(ds.samples) if s.name == names[0][:-4])
    m = ds.full_mask(i)
    assert m.shape == (8, 16) and m.sum() == 6  # classes 1 and 3 merged
    assert m[0:4, 0].all() and m[0:2, 2].all()


def test_bad_inputs_name_the_file_and_skip_bad_counts(tmp_path):
    root = tmp_path / "folder"
    _img(root / "images" / "a.png", _texture(16, 16, 0))
    _img(root / "masks" / "a.png", _mask(16, 16, (2, 6, 2, 6)))
    _img(root / "images" / "b.png", _texture(16, 16, 1))
    _img(root / "masks" / "b.png", _mask(8, 16, (1, 3, 1, 3)))  # wrong size
    _img(root / "images" / "c.png", _texture(16, 16, 2))
    _img(root / "masks" / "c.png", _mask(16, 16, (2, 6, 2, 6), value=128))  # not binary
    (root / "images" / "d.png").write_bytes(b"not a png at all")  # unreadable
    _img(root / "images" / "e.png", _texture(16, 16, 4))
    with pytest.raises(DatasetError, match=r"b\.png: mask is 16x8"):
        load_defect_dataset(root, "train")
    (root / "masks" / "b.png").unlink()
    with pytest.raises(DatasetError, match=r"c\.png: mask has values other than 0/255 or 0/1"):
        load_defect_dataset(root, "train")
    _img(root / "masks" / "b.png", _mask(8, 16, (1, 3, 1, 3)))
    ds = load_defect_dataset(root, "train", skip_bad=True)
    assert [s.name for s in ds.samples] == ["a", "e"] and len(ds.bad) == 3
    assert any("d.png: not an image file" in b for b in ds.bad)
    assert "skipped 3 bad" in ds.summary()
    # labels.csv: a malformed line is reported with file and line
    (root / "labels.csv").write_text("image,label\na.png,1\ne.png,maybe\n")
    with pytest.raises(DatasetError, match=r"labels\.csv:3: label 'maybe'"):
        load_defect_dataset(root, "train", skip_bad=False)
    (root / "labels.csv").write_text("image,label\na.png,0\n")
    with pytest.raises(DatasetError, match="labelled defect-free but its mask"):
        load_defect_dataset(root, "train")


def test_bad_severstal_rle_and_unknown_layout(tmp_path):
    root = tmp_path / "sev"
    _img(root / "train_images" / "x.jpg", _texture(8, 8, 0))
    (root / "train.csv").write_text("ImageId,ClassId,EncodedPixels\nx.jpg,1,1 2 3\n")
    errors = []
    for split in ("train", "test"):  # x.jpg lands in one of the two (hash split)
        with pytest.raises(DatasetError) as e:
            load_defect_dataset(root, split)
        errors.append(str(e.value))
    assert any("train.csv:2: run-length encoding has an odd number" in e for e in errors)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="cannot tell the layout"):
        detect_layout(tmp_path / "empty")
    with pytest.raises(DatasetError, match="does not exist"):
        load_defect_dataset(tmp_path / "nope")


def test_parse_img_size():
    assert parse_img_size(512) == (512, 512)
    assert parse_img_size("1600x256") == (256, 1600)
    assert parse_img_size((64, 32)) == (64, 32)
    assert parse_img_size(None) is None
    with pytest.raises(ValueError, match="multiples of 8"):
        parse_img_size("100x64")
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_img_size("big")


def test_data_check_validates_defect_layouts(tmp_path):
    from typer.testing import CliRunner

    from vision.cli import app
    from vision.data.defects import make_defects

    root = make_defects(tmp_path / "d", n_train=8, n_test=4, img_size=32, seed=0)
    r = CliRunner().invoke(app, ["data", "check", "--data", str(root)])
    assert r.exit_code == 0, r.output
    assert "format folder, split train: 8 images" in r.output and "format folder, split test: 4 images" in r.output
    mask = sorted((root / "test" / "masks").glob("*.png"))[0]
    mask.write_bytes(b"broken")
    r = CliRunner().invoke(app, ["data", "check", "--data", str(root)])
    assert r.exit_code == 1 and f"split test: error: {mask}: cannot read mask" in r.output


def test_folder_layout_two_images_one_name_warn(tmp_path, caplog):
    import logging

    root = make_defects(tmp_path / "d", n_train=4, n_test=2, img_size=32, seed=0)
    png = sorted((root / "train" / "images").iterdir())[0]
    Image.open(png).save(png.with_suffix(".jpg"))  # a leftover conversion beside the original
    with caplog.at_level(logging.WARNING, logger="negvision.data"):
        load_defect_dataset(root, "train")
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert f"share the name '{png.stem}'" in msg and png.with_suffix(".jpg").name in msg
