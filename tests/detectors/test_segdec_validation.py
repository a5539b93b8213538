"""`defect train` validates on held-out training images (or --val-data), keeps the best validation epoch as the run's
model, and evaluates the test split only at the end, on that model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from detectors.segdec.data import holdout_split, load_defect_dataset
from vision.cli import app
from vision.data.defects import make_defects

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/detectors/conftest.py

runner = CliRunner()
FAST = ["--width", "0.25", "--workers", "0", "--cpu", "--batch", "4", "--epochs", "2", "--backbone", "paper"]


@pytest.fixture(scope="module")
def defects(tmp_path_factory):
    return make_defects(tmp_path_factory.mktemp("defects") / "set", n_train=40, n_test=6, img_size=32, seed=0)


def test_holdout_split_is_stratified_fixed_and_never_takes_a_whole_class(defects):
    ds = load_defect_dataset(defects, "train", progress=False)
    n_pos = sum(ds.labels)
    tr, va = holdout_split(ds, 0.25)
    assert va is not None and va.split == "val" and tr.split == "train"
    assert sum(va.labels) == round(0.25 * n_pos) and len(va) - sum(va.labels) == round(0.25 * (len(ds) - n_pos))
    names = {s.image for s in va.samples}
    assert names.isdisjoint({s.image for s in tr.samples}) and len(tr) + len(va) == len(ds)
    assert {s.image for s in holdout_split(ds, 0.25)[1].samples} == names  # the same images every time
    assert holdout_split(ds, 0.0) == (ds, None)
    pos = [i for i, lab in enumerate(ds.labels) if lab == 1]
    good = [i for i, lab in enumerate(ds.labels) if lab == 0]
    tiny = ds.subset(pos[:2] + good[:3], "train")
    _, v = holdout_split(tiny, 0.01)
    assert sum(v.labels) == 1 and len(v) == 2  # at least one of each class with two or more, never all
    assert np.asarray(tr[0]["image"]).shape == np.asarray(ds[0]["image"]).shape
    with pytest.raises(ValueError, match="validation share"):
        holdout_split(ds, 1.0)


def test_the_run_model_is_the_best_validation_epoch(defects, tmp_path):
    run = tmp_path / "run"
    r = runner.invoke(app, ["defect", "train", "--data", str(defects), "--out", str(run), *FAST])
    assert r.exit_code == 0, r.output + repr(r.exception)
    spec = json.loads((run / "segdec.json").read_text())
    val = spec["train"]["validation"]
    assert spec["weights"] == "best" and val["source"] == "holdout" and val["share"] == 0.15
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["selected"]["checkpoint"] == "best" and summary["selected"]["val_AP"] == summary["best_metric"]
    assert (run / "checkpoints" / "best" / "model.safetensors").is_file()
    # evaluated on the validation images every epoch; the test split only in the final report
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 2
    # no validation: the last epoch is the model
    r = runner.invoke(app, ["defect", "train", "--data", str(defects), "--out", str(tmp_path / "noval"), *FAST,
                            "--val-split", "0"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    spec = json.loads((tmp_path / "noval" / "segdec.json").read_text())
    assert spec["weights"] == "last" and spec["train"]["validation"] is None
    assert not (tmp_path / "noval" / "checkpoints" / "best").exists()


def test_val_data_validates_on_another_folder(defects, tmp_path):
    other = make_defects(tmp_path / "other", n_train=8, n_test=0, img_size=32, seed=5)
    run = tmp_path / "run"
    r = runner.invoke(app, ["defect", "train", "--data", str(defects), "--out", str(run), *FAST, "--val-data",
                            str(other)])
    assert r.exit_code == 0, r.output + repr(r.exception)
    val = json.loads((run / "segdec.json").read_text())["train"]["validation"]
    assert val["source"] == str(other) and val["images"] == 8
    r = runner.invoke(app, ["defect", "train", "--data", str(defects), "--out", str(tmp_path / "x"), *FAST,
                            "--val-data", str(tmp_path / "missing")])
    assert r.exit_code == 1 and "missing" in r.output


def test_a_validation_set_of_one_kind(defects, tmp_path):
    """AP / AUROC cannot rank epochs on one kind of image: --val-data of one kind is refused in one line; a held-out
    share that can only take good images (one defective image) falls back to no validation with a warning."""
    good = make_defects(tmp_path / "good", n_train=6, n_test=0, img_size=32, seed=6, defect_fraction=0.0)
    r = runner.invoke(app, ["defect", "train", "--data", str(defects), "--out", str(tmp_path / "a"), *FAST,
                            "--val-data", str(good)])
    assert r.exit_code == 1 and "every validation image is good" in r.output and "good" in r.output
    one = make_defects(tmp_path / "one", n_train=12, n_test=0, img_size=32, seed=7, defect_fraction=1 / 12)
    ds = load_defect_dataset(one, "train", progress=False)
    assert sum(ds.labels) == 1
    run = tmp_path / "b"
    r = runner.invoke(app, ["defect", "train", "--data", str(one), "--out", str(run), *FAST, "--epochs", "1"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    spec = json.loads((run / "segdec.json").read_text())
    assert spec["weights"] == "last" and spec["train"]["validation"] is None
    assert ": 12 images, 1 defective" in json.loads((run / "train_summary.json").read_text())["train_data"]
