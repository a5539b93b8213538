"""benchmarks/detector_step_time.py runs on a tiny configuration and prints one JSON line."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_detector_step_time_smoke():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "detector_step_time.py"), "--backbone", "resnet18",
           "--img-size", "96", "--batch", "2", "--fpn-channels", "32", "--rounds", "1", "--warmup", "1",
           "--threads", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT, timeout=300).stdout
    res = json.loads(out.strip().splitlines()[-1])
    assert set(res["step_ms"]) == {"atss", "fcos", "retinanet"}
    assert res["ratio_vs_fcos"]["fcos"] == 1.0
