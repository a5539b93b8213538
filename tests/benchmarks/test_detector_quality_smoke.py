"""Smoke test of benchmarks/detector_quality.py: ATSS, FCOS and RetinaNet on a tiny digits set; the JSON line parses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "benchmarks" / "detector_quality.py"
MODELS = ["atss", "fcos", "retinanet"]


@pytest.mark.timeout(120)
def test_detector_quality_benchmark_smoke(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), CUDA_VISIBLE_DEVICES="")
    cmd = [
        sys.executable, str(SCRIPT), "--models", ",".join(MODELS), "--backbone", "resnet18", "--no-pretrained",
        "--img-size", "96", "--n-train", "8", "--n-val", "4", "--epochs", "1", "--batch", "4",
        "--fpn-channels", "32", "--lr-per-model", "retinanet=0.005", "--step-warmup", "1", "--step-iters", "2",
        "--workers", "0", "--threads", "1", "--data-dir", str(tmp_path / "digits"), "--out", str(tmp_path / "out"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    out = json.loads(lines[0])
    assert out["benchmark"] == "detector_quality"
    assert out["device"]["type"] == "cpu"
    cfg = out["config"]
    assert cfg["models"] == MODELS and cfg["seeds"] == [0] and cfg["img_size"] == 96
    assert cfg["lr_per_model"] == {"atss": 0.01, "fcos": 0.01, "retinanet": 0.005}
    assert cfg["data_reused"] is False
    assert Path(cfg["data"], "annotations", "instances_val.json").is_file()
    assert [(r["model"], r["seed"]) for r in out["runs"]] == [(m, 0) for m in MODELS]
    for r in out["runs"]:
        assert "error" not in r, r
        for k in ("AP", "AP50", "AP75"):
            assert 0.0 <= r[k] <= 1.0
        assert r["steps"] == 2
        assert r["train_images_per_s"] > 0 and r["step_ms"] > 0 and r["peak_memory_mb"] > 0
        assert len(r["step_ms_all"]) == 2 and r["step_batch"] == 4
    fcos = next(r for r in out["runs"] if r["model"] == "fcos")
    assert fcos["step_ratio_vs_fcos"] == pytest.approx(1.0)
    for m in MODELS:
        s = out["summary"][m]
        assert s["AP"]["n"] == 1 and s["AP"]["std"] is None
        assert s["step_ratio_vs_fcos"]["mean"] > 0
    assert sorted(out["ranking_by_AP"]) == sorted(MODELS)
    assert "step/FCOS" in proc.stderr  # the table went to stderr
