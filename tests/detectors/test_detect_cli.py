"""End to end on a tiny generated set: data make-digits / check, detect train / eval / predict, resume, demo."""

import json

import pytest
from typer.testing import CliRunner

from vision.cli import app

runner = CliRunner()

TINY = ["--backbone", "resnet18", "--pretrained", "false", "--img-size", "96", "--batch", "4", "--fpn-channels", "32",
        "--workers", "0"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    r = runner.invoke(app, ["data", "make-digits", "--out", str(out), "--format", "yolo", "--n-train", "8",
                            "--n-val", "4", "--img-size", "96"])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "exp"
    r = runner.invoke(app, ["detect", "train", "--data", str(digits), "--out", str(run), "--epochs", "2", *TINY])
    assert r.exit_code == 0, r.output
    return run


def test_data_check(digits):
    r = runner.invoke(app, ["data", "check", "--data", str(digits)])
    assert r.exit_code == 0, r.output
    assert "format yolo" in r.output and "8 images" in r.output


def test_train_writes_run_folder(trained):
    for name in ("detector.json", "config.json", "log.csv", "metrics.json", "pr_curves.png", "val_predictions.jpg",
                 "checkpoints/last/model.safetensors", "checkpoints/best/model.safetensors"):
        assert (trained / name).exists(), name
    metrics = json.loads((trained / "metrics.json").read_text())
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl", "per_class"} <= set(metrics)
    spec = json.loads((trained / "detector.json").read_text())
    assert spec["model"] == "atss" and spec["classes"] == [str(i) for i in range(10)]


def test_resume_continues(trained, digits):
    summary = json.loads((trained / "summary.json").read_text())
    r = runner.invoke(app, ["detect", "train", "--data", str(digits), "--out", str(trained), "--epochs", "3",
                            "--resume", *TINY])
    assert r.exit_code == 0, r.output
    after = json.loads((trained / "summary.json").read_text())
    assert after["steps"] > summary["steps"]


def test_eval_prints_table_and_json(trained, digits):
    r = runner.invoke(app, ["detect", "eval", "--weights", str(trained), "--data", str(digits)])
    assert r.exit_code == 0, r.output
    assert "AP50" in r.output
    r = runner.invoke(app, ["detect", "eval", "--weights", str(trained), "--data", str(digits), "--json"])
    assert r.exit_code == 0
    res = json.loads(next(ln for ln in r.output.splitlines() if ln.startswith("{")))  # stdout: one JSON line
    assert 0.0 <= res["AP"] <= 1.0 and "per_class" in res
    # the report written at the end of training is the best checkpoint's evaluation
    summary = json.loads((trained / "train_summary.json").read_text())
    assert summary["eval"]["AP"] == pytest.approx(res["AP"], abs=1e-6)
    assert summary["eval"]["AP50"] == pytest.approx(res["AP50"], abs=1e-6)


def test_predict_writes_json_and_pictures(trained, digits, tmp_path):
    src = digits / "images" / "val"
    out = tmp_path / "pred"
    r = runner.invoke(app, ["detect", "predict", "--weights", str(trained), "--source", str(src), "--out", str(out),
                            "--conf", "0.0"])
    assert r.exit_code == 0, r.output
    jsons = sorted(out.glob("*.json"))
    assert len(jsons) == 4 and len(list(out.glob("*.jpg"))) == 4
    rec = json.loads(jsons[0].read_text())
    assert {"image", "width", "height", "detections"} <= set(rec)
    for d in rec["detections"]:
        assert len(d["box"]) == 4 and d["class_name"] in [str(i) for i in range(10)]


def test_bad_inputs_give_clear_errors(tmp_path, digits, trained):
    r = runner.invoke(app, ["detect", "train", "--data", str(tmp_path), "--out", str(tmp_path / "x"), *TINY])
    assert r.exit_code == 1 and "expected one of" in r.output
    r = runner.invoke(app, ["detect", "predict", "--weights", str(trained), "--source", str(tmp_path / "none"),
                            "--out", str(tmp_path / "p")])
    assert r.exit_code == 1 and "neither an image file nor a folder" in r.output
    # a malformed YOLO label line names the file and line
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(digits, bad)
    label = sorted((bad / "labels" / "train").glob("*.txt"))[0]
    label.write_text(label.read_text() + "3 0.5 oops 0.1 0.1\n")
    r = runner.invoke(app, ["detect", "train", "--data", str(bad), "--out", str(tmp_path / "y"), *TINY])
    assert r.exit_code == 1 and label.name in r.output
    r = runner.invoke(app, ["detect", "train", "--data", str(bad), "--out", str(tmp_path / "y"), "--epochs", "1",
                            "--skip-bad", *TINY])
    assert r.exit_code == 0, r.output


def test_fcos_and_retinanet_train_through_the_same_command(digits, tmp_path):
    for name in ("fcos", "retinanet"):
        r = runner.invoke(app, ["detect", "train", "--data", str(digits), "--out", str(tmp_path / name), "--model", name,
                                "--max-steps", "1", *TINY])
        assert r.exit_code == 0, r.output


def test_demo_tiny(tmp_path):
    r = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--n-train", "8", "--n-val", "4", "--img-size", "96",
                            "--epochs", "1", "--batch", "4", "--workers", "0"])
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    assert s["AP"] is not None and (tmp_path / "demo" / "predictions").is_dir()


def test_demo_defaults_match_the_documented_configuration():
    import inspect

    from detectors import cli, demo

    params = inspect.signature(cli.demo).parameters
    assert params["epochs"].default.default == demo.DEMO_EPOCHS
    assert inspect.signature(demo.run_demo).parameters["epochs"].default == demo.DEMO_EPOCHS


# ------------------------------------------------------------------------------- messy folders, run folders


def _copy(digits, dst):
    import shutil

    shutil.copytree(digits, dst)
    (dst / ".negvision-cache.json").unlink(missing_ok=True)
    return dst


def test_a_broken_val_split_stops_training_and_data_check(digits, tmp_path):
    bad = _copy(digits, tmp_path / "bad")
    img = sorted((bad / "images" / "val").glob("*.jpg"))[1]
    img.write_bytes(img.read_bytes()[:-500])  # a copy cut short: only a full decode notices
    r = runner.invoke(app, ["data", "check", "--data", str(bad)])
    assert r.exit_code == 1 and "split train: error" not in r.output and f"split val: error: {img}" in r.output
    assert "format yolo, split train: 8 images" in r.output
    r = runner.invoke(app, ["detect", "train", "--data", str(bad), "--out", str(tmp_path / "run"), *TINY])
    assert r.exit_code == 1 and str(img) in r.output and not (tmp_path / "run").exists()
    r = runner.invoke(app, ["detect", "train", "--data", str(bad), "--out", str(tmp_path / "run"), "--max-steps", "1",
                            "--skip-bad", *TINY])
    assert r.exit_code == 0, r.output
    skipped = (tmp_path / "run" / "skipped.txt").read_text()
    assert skipped.startswith(f"[val] {img}") and "skipped 1 bad items" in r.output
    assert (tmp_path / "run" / "checkpoints" / "best").is_dir()  # validation ran on the 3 good images


def test_an_absent_val_split_trains_without_validation(digits, tmp_path):
    data = _copy(digits, tmp_path / "noval")
    (data / "data.yaml").write_text("path: .\ntrain: images/train\nnames: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]\n")
    r = runner.invoke(app, ["detect", "train", "--data", str(data), "--out", str(tmp_path / "run"), "--max-steps", "1",
                            *TINY])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "checkpoints" / "last").is_dir() and not (tmp_path / "run" / "checkpoints" / "best").exists()


def test_a_used_run_folder_is_never_overwritten(digits, trained, tmp_path):
    import shutil

    run = tmp_path / "exp"
    shutil.copytree(trained, run)
    before = (run / "log.csv").read_text()
    r = runner.invoke(app, ["detect", "train", "--data", str(digits), "--out", str(run), "--max-steps", "1", *TINY])
    assert r.exit_code == 0, r.output
    assert f"run folder: {tmp_path / 'exp2'}" in r.output and (run / "log.csv").read_text() == before
    assert (tmp_path / "exp2" / "checkpoints" / "last").is_dir()
    r = runner.invoke(app, ["detect", "train", "--data", str(digits), "--out", str(run), "--max-steps", "1",
                            "--exist-ok", *TINY])
    assert r.exit_code == 0, r.output
    assert f"run folder: {run}" in r.output
    rows = (run / "log.csv").read_text().strip().splitlines()
    assert len(rows) == 2 and len(list((run / "tb").iterdir())) == 1  # header + one step, one TensorBoard file


def test_a_run_that_stopped_before_training_is_reused_not_numbered_past(digits, tmp_path):
    """A mistyped backbone stops after config.yaml is written: fixing it and running again uses the same folder."""
    run = tmp_path / "exp"
    r = runner.invoke(app, ["detect", "train", "--data", str(digits), "--out", str(run), "--max-steps", "1",
                            *TINY, "--backbone", "resnett18"])  # the last --backbone wins
    assert r.exit_code == 2 and "Did you mean" in r.output, r.output
    assert run.is_dir() and not (run / "checkpoints").exists()
    r = runner.invoke(app, ["detect", "train", "--data", str(digits), "--out", str(run), "--max-steps", "1", *TINY])
    assert r.exit_code == 0, r.output
    assert f"run folder: {run}" in r.output and not (tmp_path / "exp2").exists()


def test_predict_outputs_never_collide_and_follow_exif(trained, tmp_path):
    import numpy as np
    from PIL import Image

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    arr = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    Image.fromarray(arr).save(src / "a.jpg")
    Image.fromarray(arr).save(src / "a.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated: 64 wide, 96 high
    Image.fromarray(arr).save(src / "sub" / "a.jpg", exif=exif.tobytes())
    (src / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "pred"
    r = runner.invoke(app, ["detect", "predict", "--weights", str(trained), "--source", str(src), "--out", str(out)])
    assert r.exit_code == 1 and "broken.jpg" in r.output
    r = runner.invoke(app, ["detect", "predict", "--weights", str(trained), "--source", str(src), "--out", str(out),
                            "--skip-bad"])
    assert r.exit_code == 0, r.output
    assert {p.relative_to(out).as_posix() for p in out.rglob("*.json")} == {"a.jpg.json", "a.png.json", "sub/a.json"}
    rec = json.loads((out / "sub" / "a.json").read_text())
    assert (rec["width"], rec["height"]) == (64, 96)
    assert "broken.jpg" in (out / "skipped.txt").read_text()


def test_a_damaged_checkpoint_gives_one_line(trained, digits, tmp_path):
    import shutil

    run = tmp_path / "damaged"
    shutil.copytree(trained, run)
    for name in ("best", "last"):
        f = run / "checkpoints" / name / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    r = runner.invoke(app, ["detect", "eval", "--weights", str(run), "--data", str(digits)])
    assert r.exit_code == 1 and "Traceback" not in r.output
    line = r.output.strip().splitlines()[-1]
    assert line.startswith("error: ") and "model.safetensors" in line and "damaged checkpoint" in line


def test_resume_falls_back_past_a_damaged_checkpoint(trained, digits, tmp_path, caplog):
    import logging
    import shutil

    run = tmp_path / "fallback"
    shutil.copytree(trained, run)
    older = sorted((run / "checkpoints").glob("step-*"))
    assert len(older) == 1  # --keep-last 2: the newest and one older checkpoint
    last = run / "checkpoints" / "last" / "training_state.pt"
    last.write_bytes(last.read_bytes()[:100])
    steps = json.loads((run / "summary.json").read_text())["steps"]
    with caplog.at_level(logging.WARNING):
        r = runner.invoke(app, ["detect", "train", "--data", str(digits), "--out", str(run), "--resume",
                                "--max-steps", str(steps + 1), *TINY])
    assert r.exit_code == 0, r.output
    assert any("training_state.pt: damaged checkpoint file" in m and older[0].name in m for m in caplog.messages)
    assert json.loads((run / "summary.json").read_text())["steps"] == steps + 1


def test_problems_of_both_splits_are_reported_together(digits, tmp_path):
    bad = _copy(digits, tmp_path / "both")
    tr = sorted((bad / "images" / "train").glob("*.jpg"))[0]
    va = sorted((bad / "images" / "val").glob("*.jpg"))[0]
    tr.write_bytes(b"")
    va.write_bytes(b"not an image")
    r = runner.invoke(app, ["detect", "train", "--data", str(bad), "--out", str(tmp_path / "run"), *TINY])
    assert r.exit_code == 1 and str(tr) in r.output and f"split 'val': {va}" in r.output
    assert r.output.count("--skip-bad") == 1
