"""benchmarks/perpneg_flow_step.py runs on the smallest tiny SD3 and Flux transformers and prints one JSON line."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_perpneg_flow_step_smoke():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "perpneg_flow_step.py"), "--size", "32", "--hidden", "32",
           "--layers", "1", "--max-seq", "8", "--steps", "3", "--repeats", "1", "--warmup", "0", "--threads", "1"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    res = json.loads(lines[0])
    assert res["benchmark"] == "perpneg_flow_step" and res["threads"] == 1
    for family in ("sd3", "flux"):
        assert res[family]["cfg_step_ms"] > 0
        for k in ("1", "2"):
            r = res[family]["k"][k]
            assert r["step_ms"] > 0 and r["ratio_vs_cfg"] > 0
            assert r["target_ratio_vs_cfg"] == (int(k) + 2) / 2
    assert res["flux"]["no_cfg_step_ms"] > 0
    assert "ms/step" in proc.stderr  # the table went to stderr
