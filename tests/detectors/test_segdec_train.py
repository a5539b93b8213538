"""SegDecNet end to end on a tiny generated set: train / eval / predict through the CLI, exact resume, metrics."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _settings import train_segdec
from PIL import Image
from typer.testing import CliRunner

from detectors.segdec import image_metrics
from detectors.segdec.cli import app
from detectors.segdec.metrics import dice_iou
from vision.data.defects import make_defects

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/detectors/conftest.py


FAST = ["--width", "0.25", "--workers", "0", "--cpu", "--batch", "4"]


@pytest.fixture(scope="module")
def defect_set(tmp_path_factory) -> Path:
    return make_defects(tmp_path_factory.mktemp("defects") / "set", n_train=16, n_test=8, img_size=32, seed=0)


def test_image_metrics_hand_checked():
    m = image_metrics([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert m["AP"] == pytest.approx(0.8333333, rel=1e-6)
    assert m["AUROC"] == pytest.approx(0.75)
    # best F1 = 0.8 at threshold 0.35 (TP 2, FP 1)
    assert m["threshold"] == pytest.approx(0.35) and m["F1"] == pytest.approx(0.8)
    assert (m["TP"], m["FP"], m["FN"], m["TN"]) == (2, 1, 0, 1)
    assert m["FP_at_FN0"] == 1 and m["detection_rate"] == 1.0 and m["accuracy"] == 0.75
    perfect = image_metrics([0, 1, 0, 1], [0.2, 0.9, 0.1, 0.7])
    assert perfect["AP"] == 1.0 and perfect["FP"] == 0 and perfect["FN"] == 0 and perfect["FP_at_FN0"] == 0
    assert np.isnan(image_metrics([0, 0], [0.1, 0.2])["AUROC"])
    with pytest.raises(ValueError):
        image_metrics([0, 1], [0.5])


def test_dice_iou():
    gt = np.zeros((4, 4), bool)
    gt[:2, :2] = True  # 4 pixels
    pred = np.zeros((4, 4), bool)
    pred[:2, :3] = True  # 6 pixels, 4 overlap
    d, j = dice_iou(pred, gt)
    assert d == pytest.approx(2 * 4 / 10) and j == pytest.approx(4 / 6)
    assert dice_iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == (1.0, 1.0)


def test_train_eval_predict_cli(defect_set, tmp_path):
    run = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", "--data", str(defect_set), "--out", str(run), "--epochs", "2",
                                 "--eval-every", "1", *FAST])
    assert r.exit_code == 0, r.output + repr(r.exception)
    spec = json.loads((run / "segdec.json").read_text())
    assert spec["img_size"] == [32, 32] and spec["model"]["grad_multiplier"] == 0.0
    assert spec["dataset_kind"] == "folder" and spec["train"]["frequency"] is True
    for f in ("checkpoints/last/model.safetensors", "checkpoints/last/sampler.safetensors", "log.csv",
              "metrics.csv", "eval/results.csv", "eval/metrics.json", "eval/pr_curve.png", "eval/roc_curve.png",
              "eval/heatmaps.jpg", "train_summary.json"):
        assert (run / f).is_file(), f
    log_rows = list(csv.DictReader(open(run / "log.csv")))
    assert {"loss", "loss_seg", "loss_dec", "w_seg", "w_dec"} <= set(log_rows[0])
    assert float(log_rows[0]["w_seg"]) == 1.0 and float(log_rows[0]["w_dec"]) == 0.0  # epoch 0 of 2

    out = tmp_path / "eval"
    r = CliRunner().invoke(app, ["eval", "--weights", str(run), "--out", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    metrics = json.loads((out / "metrics.json").read_text())
    for k in ("AP", "AUROC", "FP", "FN", "FP_at_FN0", "detection_rate", "threshold", "dice", "iou"):
        assert k in metrics
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 8 and {"name", "label", "score", "decision", "dice", "iou"} <= set(rows[0])
    assert (out / "pr_curve.png").is_file() and (out / "roc_curve.png").is_file()

    pred = tmp_path / "pred"
    r = CliRunner().invoke(app, ["predict", "--weights", str(run), "--source", str(defect_set / "test" / "images"),
                                 "--out", str(pred), "--device", "cpu"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    rows = list(csv.DictReader(open(pred / "predictions.csv")))
    assert len(rows) == 8 and all(0.0 <= float(x["probability"]) <= 1.0 for x in rows)
    mask = np.asarray(Image.open(pred / "masks" / "test_0000.png"))
    assert mask.shape == (32, 32) and set(np.unique(mask).tolist()) <= {0, 255}
    assert (pred / "heatmaps" / "test_0000.jpg").is_file()
    # bad input gives a clear error, not a traceback
    r = CliRunner().invoke(app, ["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "x"), *FAST])
    assert r.exit_code == 1 and "does not exist" in r.output


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / "last" / "model.safetensors"))


def test_resume_mid_epoch_is_exact(defect_set, tmp_path):
    kw = dict(epochs=3, batch=4, width=0.25, device="cpu", progress=False, eval_every=0, final_eval=False, seed=1)
    full = train_segdec(defect_set, tmp_path / "full", **kw)
    steps = full["steps"]
    assert steps >= 4
    part = train_segdec(defect_set, tmp_path / "part", max_steps=steps // 2 + 1, **kw)  # stops inside an epoch
    assert part["steps"] == steps // 2 + 1
    resumed = train_segdec(defect_set, tmp_path / "part", resume=True, **kw)
    assert resumed["steps"] == steps
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_broken_test_split_is_an_error_and_skip_bad_lists_it(defect_set, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(defect_set, data)
    (data / ".negvision-cache.json").unlink(missing_ok=True)
    img = data / "test" / "images" / "test_0003.png"
    img.write_bytes(img.read_bytes()[:-40])  # truncated PNG in the test split
    r = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "1",
                                 *FAST])
    assert r.exit_code == 1 and str(img) in r.output and "Traceback" not in r.output
    kw = dict(epochs=1, batch=4, width=0.25, device="cpu", progress=False, final_eval=False)
    s = train_segdec(data, tmp_path / "run", skip_bad=True, **kw)
    assert s["skipped"] == {"train": 0, "test": 1}
    assert (tmp_path / "run" / "skipped.txt").read_text().startswith(f"[test] {img}")
    again = train_segdec(data, tmp_path / "run", skip_bad=True, **kw)  # a used run folder is never overwritten
    assert again["out"] == str(tmp_path / "run2")


def test_predict_mirrors_sub_folders_and_applies_exif(defect_set, tmp_path):
    kw = dict(epochs=1, batch=4, width=0.25, device="cpu", progress=False, final_eval=False, eval_every=0)
    run = Path(train_segdec(defect_set, tmp_path / "run", **kw)["out"])
    src = tmp_path / "src"
    (src / "line2").mkdir(parents=True)
    arr = np.asarray(Image.open(defect_set / "test" / "images" / "test_0000.png").convert("L"))[:, :24]  # 24 x 32
    Image.fromarray(arr).save(src / "part.png")
    exif = Image.Exif()
    exif[0x0112] = 8  # displayed rotated: 32 wide, 24 high
    Image.fromarray(arr).convert("RGB").save(src / "line2" / "part.jpg", exif=exif.tobytes())
    pred = tmp_path / "pred"
    r = CliRunner().invoke(app, ["predict", "--weights", str(run), "--source", str(src), "--out", str(pred),
                                 "--device", "cpu"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert (pred / "masks" / "part.png").is_file() and (pred / "masks" / "line2" / "part.png").is_file()
    assert np.asarray(Image.open(pred / "masks" / "line2" / "part.png")).shape == (24, 32)
    weights = run / "checkpoints" / "last" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated: eval / predict give one line naming it
    for cmd in (["eval", "--weights", str(run)], ["predict", "--weights", str(run), "--source", str(src),
                                                  "--out", str(tmp_path / "p2")]):
        r = CliRunner().invoke(app, [*cmd, "--device", "cpu"])
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        assert r.output.strip().splitlines()[-1].startswith(f"error: {weights}: damaged checkpoint file")


@pytest.mark.gpu
def test_gpu_forward_backward_bf16_and_short_training(defect_set, tmp_path):
    from detectors.segdec import SegDecNet

    m = SegDecNet().cuda()
    x = torch.rand(2, 1, 64, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        dec, seg = m(x)
    (dec.float().sum() + seg.float().mean()).backward()
    assert torch.isfinite(dec.float()).all() and m.volume[0][0].weight.grad is not None
    s = train_segdec(defect_set, tmp_path / "gpu", epochs=1, batch=4, progress=False, eval_every=0)
    assert s["steps"] >= 1 and s["eval"]["n_images"] == 8


def test_defect_train_writes_a_replayable_config(defect_set, tmp_path):
    import yaml

    from vision.cli import app as root

    run = tmp_path / "run"
    r = CliRunner().invoke(root, ["defect", "train", "--data", str(defect_set), "--out", str(run), "--epochs", "1",
                                  "--eval-every", "0", "--optimizer", "adamw", *FAST])
    assert r.exit_code == 0, r.output + repr(r.exception)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["optimizer"] == "adamw" and cfg["dataset_kind"] == "auto" and cfg["width"] == 0.25
    r = CliRunner().invoke(root, ["defect", "train", "--config", str(run / "config.yaml"), "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output + repr(r.exception)
    again = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())
    assert {k: v for k, v in again.items() if k != "out"} == {k: v for k, v in cfg.items() if k != "out"}
    r = CliRunner().invoke(root, ["defect", "train", "--data", str(defect_set), "--dataset-kind", "kdsd"])
    assert r.exit_code == 2 and "ksdd" in r.output
