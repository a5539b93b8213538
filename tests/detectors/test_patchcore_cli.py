"""`defect train --method patchcore` end to end: a run folder that `defect eval` / `defect predict` read like a
SegDecNet run, the decision threshold from the validation images, and clear errors."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from vision.cli import app
from vision.data.defects import make_defects

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/detectors/conftest.py

runner = CliRunner()


@pytest.fixture(scope="module")
def defects(tmp_path_factory):
    return make_defects(tmp_path_factory.mktemp("defects") / "set", n_train=30, n_test=8, img_size=32, seed=0)


def test_train_eval_predict(defects, tmp_path):
    run = tmp_path / "pc"
    r = runner.invoke(app, ["defect", "train", "--data", str(defects), "--out", str(run), "--method", "patchcore",
                            "--workers", "0", "--cpu"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert "memory bank:" in r.output and "AUROC=" in r.output
    spec = json.loads((run / "segdec.json").read_text())
    assert spec["method"] == "patchcore" and spec["model"]["bank_size"] > 0
    assert spec["threshold"] == spec["validation_metrics"]["threshold"]  # chosen on validation, not on test
    assert spec["train"]["validation"]["source"] == "holdout"
    assert (run / "checkpoints" / "last" / "model.safetensors").is_file() and (run / "eval" / "metrics.json").is_file()
    r = runner.invoke(app, ["defect", "eval", "--weights", str(run), "--device", "cpu"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert json.loads((run / "eval" / "metrics.json").read_text())["AUROC"] >= 0.0
    pred = tmp_path / "pred"
    r = runner.invoke(app, ["defect", "predict", "--weights", str(run), "--source", str(defects / "test" / "images"),
                            "--out", str(pred), "--device", "cpu"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    rows = list(csv.DictReader(open(pred / "predictions.csv")))
    assert len(rows) == 8
    thr = spec["threshold"]
    assert all(int(x["defective"]) == int(float(x["probability"]) >= thr) for x in rows)


def test_patchcore_usage_errors(defects, tmp_path):
    base = ["defect", "train", "--data", str(defects), "--method", "patchcore", "--cpu"]
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "a"), "--backbone", "paper"])
    assert r.exit_code == 2 and "patchcore needs a pretrained" in r.output
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "a"), "--resume"])
    assert r.exit_code == 2 and "no training steps" in r.output
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "a"), "--method", "knn"])
    assert r.exit_code == 2 and "'knn' is not one of" in r.output
    only_bad = make_defects(tmp_path / "bad", n_train=6, n_test=0, img_size=32, seed=1, defect_fraction=1.0)
    r = runner.invoke(app, ["defect", "train", "--data", str(only_bad), "--method", "patchcore", "--cpu", "--out",
                            str(tmp_path / "b")])
    assert r.exit_code == 1 and "defect-free image" in r.output


def test_export_to_onnx_gives_the_same_scores_and_the_validation_threshold(defects, tmp_path):
    import numpy as np
    import onnxruntime as ort

    run = tmp_path / "pc"
    r = runner.invoke(app, ["defect", "train", "--data", str(defects), "--out", str(run), "--method", "patchcore",
                            "--cpu", "--workers", "0", "--backbone", "resnet18", "--pretrained", "false"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    r = runner.invoke(app, ["defect", "export", "--weights", str(run), "--out", str(tmp_path / "pc.onnx")])
    assert r.exit_code == 0, r.output + repr(r.exception)
    sess = ort.InferenceSession(str(tmp_path / "pc.onnx"))
    spec = json.loads((run / "segdec.json").read_text())
    assert float(sess.get_modelmeta().custom_metadata_map["threshold"]) == pytest.approx(spec["threshold"])
    preds = {}
    for name, weights in (("torch", run), ("onnx", tmp_path / "pc.onnx")):
        out = tmp_path / f"pred_{name}"
        r = runner.invoke(app, ["defect", "predict", "--weights", str(weights), "--source",
                                str(defects / "test" / "images"), "--out", str(out), "--device", "cpu"])
        assert r.exit_code == 0, r.output + repr(r.exception)
        preds[name] = np.array([float(x["probability"]) for x in csv.DictReader(open(out / "predictions.csv"))])
    np.testing.assert_allclose(preds["onnx"], preds["torch"], atol=1e-4)
