"""A new detection format and a new detector, each registered next to its own code (here: this test), work through
every command with no other edit: `data check`, `detect train / eval / predict` (as the OOD score test does for a
score). The CLI's choices and help come from the registries."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vision.cli import app

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/detectors/conftest.py
TINY = ["--backbone", "resnet18", "--pretrained", "false", "--img-size", "64", "--batch", "4", "--fpn-channels", "32",
        "--workers", "0"]


def _toy_detect(p: Path) -> bool:
    return p.is_dir() and (p / "toy_train.csv").is_file()


def _toy_read(root: Path, split: str, problems, images):
    """The toy layout: ROOT/toy_{split}.csv with rows file,x1,y1,x2,y2,class and the images beside it."""
    from vision.data.formats.base import DatasetError, Loaded, Record, SplitNotFoundError, check_box

    f = root / f"toy_{split}.csv"
    if not f.is_file():
        raise SplitNotFoundError(f"{root}: no toy_{split}.csv")
    rows = list(csv.DictReader(open(f)))
    classes = sorted({r["class"] for r in csv.DictReader(open(root / "toy_train.csv"))})
    items = []
    for name in sorted({r["file"] for r in rows}):
        path = root / name
        try:
            w, h = images.size(path, str(f))
            mine = [r for r in rows if r["file"] == name]
            boxes = [check_box([float(r[k]) for k in ("x1", "y1", "x2", "y2")], w, h, f"{f}: {name}") for r in mine]
        except DatasetError as e:
            problems.add(e)
            continue
        items.append(Record(path, name, w, h, np.asarray(boxes, np.float32).reshape(-1, 4),
                            np.asarray([classes.index(r["class"]) for r in mine], np.int64)))
    return Loaded(classes, items, root)


@pytest.fixture
def toy_world(tmp_path):
    """A toy format and a toy detector in the registries for one test (removed afterwards)."""
    from detectors.zoo import DETECTORS
    from vision.data.formats import FORMATS, register_format

    register_format("toycsv", "detection", detect=_toy_detect, read=_toy_read, layout="toy_{split}.csv + images",
                    priority=5)

    @DETECTORS.register("toy_atss")
    def toy_atss(num_classes: int, **kwargs):
        """ATSS under another name: a new detector as far as every command can tell."""
        return DETECTORS.create("atss", num_classes=num_classes, **kwargs)

    rng = np.random.default_rng(0)
    root = tmp_path / "toy"
    root.mkdir()
    for split, n in (("train", 8), ("val", 4)):
        with open(root / f"toy_{split}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["file", "x1", "y1", "x2", "y2", "class"])
            for i in range(n):
                img = np.zeros((64, 64, 3), np.uint8)
                x, y, s = (int(v) for v in rng.integers(4, 36, 3))
                s = max(s // 2, 10)
                img[y:y + s, x:x + s] = (255, 255, 255) if i % 2 else (255, 0, 0)
                Image.fromarray(img).save(root / f"{split}_{i}.png")
                w.writerow([f"{split}_{i}.png", x, y, x + s, y + s, "white" if i % 2 else "red"])
    yield root
    FORMATS.unregister("toycsv")
    DETECTORS.unregister("toy_atss")


def test_a_registered_format_and_detector_need_no_other_edit(toy_world, tmp_path):
    r = runner.invoke(app, ["data", "check", "--data", str(toy_world)])
    assert r.exit_code == 0, r.output
    assert "format toycsv" in r.output and "8 images" in r.output
    r = runner.invoke(app, ["detect", "train", "--help"], env={"COLUMNS": "250"})
    assert "toy_atss" in r.output  # the --model choices are the registry's
    run = tmp_path / "run"
    r = runner.invoke(app, ["detect", "train", "--data", str(toy_world), "--model", "toy_atss", "--out", str(run),
                            "--epochs", "1", *TINY])
    assert r.exit_code == 0, r.output + repr(r.exception)
    spec = json.loads((run / "detector.json").read_text())
    assert spec["model"] == "toy_atss" and spec["classes"] == ["red", "white"]
    r = runner.invoke(app, ["detect", "eval", "--weights", str(run), "--data", str(toy_world), "--split", "val"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    r = runner.invoke(app, ["detect", "predict", "--weights", str(run), "--source", str(toy_world / "val_0.png"),
                            "--out", str(tmp_path / "pred")])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert any((tmp_path / "pred").iterdir())
