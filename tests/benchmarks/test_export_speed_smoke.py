"""benchmarks/export_speed.py runs on a tiny configuration and prints one JSON line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_export_speed_smoke(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "export_speed.py"), "--n", "4", "--img-size", "128",
           "--threads", "1", "--workdir", str(tmp_path),
           # a small random backbone: the export path is the same, the suite spends ~25 s less than with EfficientNet
           "--backbone", "resnet10t", "--random-backbone", "--fpn-channels", "32"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT, timeout=300).stdout
    res = json.loads(out.strip().splitlines()[-1])
    assert res["n_images"] == 4 and res["img_size"] == 128
    assert set(res["images_per_s"]) >= {"torch_cpu_1t", "ort_cpu_1t"}
    assert all(v > 0 for v in res["images_per_s"].values())
    assert res["export_s"] > 0 and res["onnx_mb"] > 1
    assert res["max_score_diff_cpu"] < 1e-3  # both paths give the same detections
    assert (tmp_path / "model.onnx").is_file()
