"""Smoke test of benchmarks/atss_assign.py: tiny layout, two gt counts, one repeat; the JSON line parses.

``--no-profile`` skips the torch.profiler allocation pass (its start-up alone takes 2-7 s on a shared 2-core box) and
``--threads 1`` keeps OpenMP from stalling when the cores are oversubscribed, so the test stays well under 20 s."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "benchmarks" / "atss_assign.py"


@pytest.mark.timeout(120)
def test_atss_assign_benchmark_smoke():
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--gts", "1,5", "--repeats", "1", "--image-size", "128x128",
         "--threads", "1", "--no-profile"],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    out = json.loads(lines[0])
    assert out["benchmark"] == "atss_assign"
    assert out["device"] == "cpu"
    assert out["threads"] == 1
    assert out["all_identical"] is True
    assert out["layout"] == "128x128 P3-P7"
    assert out["anchors"] == 16 * 16 + 8 * 8 + 4 * 4 + 2 * 2 + 1
    assert [r["gts"] for r in out["results"]] == [1, 5]
    for r in out["results"]:
        assert r["identical"] is True
        assert r["compared"] == ["dense", "loop", "vectorised"]
        for impl in ("vectorised", "loop", "dense"):
            assert r[f"{impl}_ms"] > 0
            assert r[f"{impl}_peak_mib"] is not None
            assert r[f"{impl}_alloc_peak_mib"] is None
        assert r["speedup_vs_loop"] > 0
    assert "identical" in proc.stderr  # the table header went to stderr
