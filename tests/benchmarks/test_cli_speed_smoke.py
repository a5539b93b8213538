"""benchmarks/cli_speed.py runs and the wrong-choice cases exit 2 (the figures are for the README, not asserted)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_cli_speed_smoke():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "cli_speed.py"), "--repeats", "1"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["exit_codes"]["wrong_choice_amp"] == 2 and out["exit_codes"]["negvision_help"] == 0
    assert set(out["median_s"]) >= {"python_startup", "negvision_help", "wrong_choice_optimizer"}
