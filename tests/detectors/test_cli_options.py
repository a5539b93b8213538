"""The shared command-line options: --version, choices checked while parsing, registry misses in one line,
--config files and the config.yaml every run writes, --resume [PATH], -q / -v anywhere, --device."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import yaml
from typer.testing import CliRunner

from vision.cli import app

runner = CliRunner()
TINY = ["--backbone", "resnet18", "--pretrained", "false", "--img-size", "64", "--batch", "4", "--fpn-channels", "32",
        "--workers", "0", "--max-steps", "1"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    r = runner.invoke(app, ["data", "make-digits", "--out", str(out), "--format", "yolo", "--n-train", "4",
                            "--n-val", "2", "--img-size", "64"])
    assert r.exit_code == 0, r.output
    return out


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.startswith("negvision ")


@pytest.mark.parametrize("args,allowed", [(["--amp", "maybe"], "auto"), (["--optimizer", "foo"], "sgd"),
                                           (["--scheduler", "linear"], "cosine")])
def test_a_wrong_choice_fails_fast_with_the_allowed_values(args, allowed):
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "vision.cli", "detect", "train", "--data", "x", *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and allowed in proc.stderr, proc.stderr
    assert "torch" not in proc.stderr
    assert time.perf_counter() - t0 < 30  # the figure (well under 1 s) is measured in benchmarks/cli_speed.py


def test_registry_miss_is_one_line_with_close_matches(digits, tmp_path):
    r = runner.invoke(app, ["detect", "train", "--data", str(digits), "--out", str(tmp_path / "r"), "--model", "atts",
                            *TINY])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "unknown detector 'atts'. Did you mean: atss" in r.output.strip().splitlines()[-1]


def test_config_file_replays_a_run_and_cli_options_win(digits, tmp_path):
    run = tmp_path / "a"
    r = runner.invoke(app, ["detect", "train", "--data", str(digits), "--out", str(run), "--lr", "0.005", *TINY])
    assert r.exit_code == 0, r.output
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["lr"] == 0.005 and cfg["optimizer"] == "sgd" and cfg["amp"] == "auto" and cfg["data"] == str(digits)
    assert "resume" not in cfg and "config" not in cfg
    cfg["out"] = str(tmp_path / "b")
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(cfg))
    r = runner.invoke(app, ["detect", "train", "--config", str(tmp_path / "b.yaml"), "--seed", "3"])
    assert r.exit_code == 0, r.output
    replay = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())
    assert {k: v for k, v in replay.items() if k not in ("out", "seed")} == \
        {k: v for k, v in cfg.items() if k not in ("out", "seed")}
    assert replay["seed"] == 3 and replay["out"] == str(tmp_path / "b")
    meta = json.loads((tmp_path / "b" / "config.json").read_text())
    assert meta["train"]["lr"] == 0.005


def test_config_file_errors_name_the_key_and_file(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("data: x\nimg_szie: 64\n")
    r = runner.invoke(app, ["detect", "train", "--config", str(bad)])
    assert r.exit_code == 2 and "unknown key 'img_szie'" in r.output and str(bad) in r.output
    assert "did you mean: img-size" in r.output
    bad.write_text("data: [x\n")
    r = runner.invoke(app, ["detect", "train", "--config", str(bad)])
    assert r.exit_code == 2 and "invalid YAML" in r.output


def test_resume_takes_an_optional_path(digits, tmp_path):
    run = tmp_path / "r"
    assert runner.invoke(app, ["detect", "train", "--data", str(digits), "--out", str(run), *TINY]).exit_code == 0
    r = runner.invoke(app, ["detect", "train", "--data", str(digits), "--out", str(run), "--resume",
                            *TINY[:-1], "2"])
    assert r.exit_code == 0, r.output
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
    ck = run / "checkpoints" / "last"
    r = runner.invoke(app, ["detect", "train", "--data", str(digits), "--out", str(run), "--resume", str(ck),
                            *TINY[:-1], "3"])
    assert r.exit_code == 0, r.output
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    r = runner.invoke(app, ["detect", "train", "--data", str(digits), "--out", str(run), "--resume",
                            str(tmp_path / "nope"), *TINY])
    assert r.exit_code == 2 and "no such checkpoint folder" in r.output


def test_device_and_verbosity_flags(digits, tmp_path):
    r = runner.invoke(app, ["detect", "train", "--data", str(digits), "--device", "tpu", *TINY])
    assert r.exit_code == 2 and "expected cpu, cuda, cuda:N or mps" in r.output
    r = runner.invoke(app, ["detect", "train", "--data", str(digits), "--out", str(tmp_path / "q"), "--device", "cpu",
                            "-q", *TINY])
    assert r.exit_code == 0, r.output
    assert "eval @ step" not in r.output  # -q: only warnings and errors
    r = runner.invoke(app, ["-v", "detect", "train", "--data", str(digits), "--out", str(tmp_path / "v"), "--cpu",
                            *TINY])
    assert r.exit_code == 0 and "eval @ step 1" in r.output  # -v: info and debug


def test_fpn_channels_must_be_a_multiple_of_32():
    r = runner.invoke(app, ["detect", "train", "--data", "x", "--fpn-channels", "48"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "48 is not a multiple of 32" in r.output and "try 32 or 64" in r.output


def test_resume_with_a_damaged_spec_file_names_it(digits, tmp_path):
    run = tmp_path / "r"
    r = runner.invoke(app, ["detect", "train", "--data", str(digits), "--out", str(run), *TINY])
    assert r.exit_code == 0, r.output
    (run / "detector.json").write_text('{"classes": [')  # cut off mid-write by another tool
    r = runner.invoke(app, ["detect", "train", "--data", str(digits), "--out", str(run), "--resume", *TINY])
    assert r.exit_code == 1 and "Traceback" not in r.output
    last = r.output.strip().splitlines()[-1]
    assert "detector.json: cannot read the run's spec file" in last, r.output


def test_truncated_pretrained_backbone_file_is_one_line(digits, tmp_path):
    f = tmp_path / "backbone.pth"
    import torch

    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, f)
    f.write_bytes(f.read_bytes()[:100])
    args = [a if a != "false" else str(f) for a in TINY]  # --pretrained FILE
    r = runner.invoke(app, ["detect", "train", "--data", str(digits), "--out", str(tmp_path / "r"), *args])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    assert "backbone.pth: damaged checkpoint file" in r.output.strip().splitlines()[-1]


def test_an_output_path_through_a_file_is_one_line_exit_1(tmp_path):
    (tmp_path / "afile").write_text("x")
    proc = subprocess.run([sys.executable, "-m", "vision.cli", "data", "make-digits", "--out",
                           str(tmp_path / "afile" / "sub"), "--n-train", "2", "--n-val", "1", "--img-size", "32"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {tmp_path / 'afile'}") and "a part of the path is a file, not a folder" in last
