"""benchmarks/determinism_cost.py runs on a tiny configuration and prints one JSON line."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_determinism_cost_smoke():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "determinism_cost.py"), "--backbone", "resnet18",
           "--img-size", "64", "--batch", "2", "--fpn-channels", "32", "--segdec-size", "64", "--rounds", "1",
           "--warmup", "0", "--threads", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT, timeout=300).stdout
    res = json.loads(out.strip().splitlines()[-1])
    assert set(res["step_ms"]) == {"atss", "segdec"} and not res["errors"]
    assert all(v > 0 for m in res["step_ms"].values() for v in m.values())
