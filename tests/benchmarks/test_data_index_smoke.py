"""Smoke test of benchmarks/data_index.py: 60 tiny images; the cold pass decodes them all, the warm pass answers
them all from the cache, and the JSON line parses.

Each pass runs in its own subprocess (three of them import torch through the data layer), so the test takes a
few seconds; ``--threads 2`` keeps the checker's pool small on a shared box."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "benchmarks" / "data_index.py"
N = 60


@pytest.mark.timeout(120)
def test_data_index_benchmark_smoke(tmp_path):
    out_dir = tmp_path / "data"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("NEGVISION_CACHE_DIR", None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--n", str(N), "--img-size", "64", "--out", str(out_dir), "--threads", "2"],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    out = json.loads(lines[0])
    assert out["benchmark"] == "data_index"
    assert out["n_images"] == N
    assert out["img_size"] == 64
    assert out["threads"] == 2
    assert out["generate_s"] > 0

    cold, warm, header, naive = out["cold"], out["warm"], out["header_only"], out["naive_pil_loop"]
    assert cold["decoded"] == N and cold["cached"] == 0
    assert warm["cached"] == N and warm["decoded"] == 0
    assert header["decoded"] == 0 and header["cached"] == 0 and header["checked"] == N
    for r in (cold, warm, header):
        assert r["n_dataset"] == N
        assert r["workers"] == 2
        assert r["wall_s"] > 0 and r["images_per_s"] > 0
        assert r["peak_rss_mb"] >= 0 and r["py_peak_mb"] > 0
    assert naive["n"] == N and naive["images_per_s"] > 0
    assert out["cold_over_warm"] > 0

    # the cache went next to the data, nothing to the user cache folder
    assert cold["cache_bytes"] > 0 and cold["user_cache_files"] == 0
    assert (out_dir / ".negvision-cache.json").is_file()
    assert (out_dir / "gen.json").is_file()
    assert len(list((out_dir / "images" / "train").glob("*.jpg"))) == N
    assert len(list((out_dir / "labels" / "train").glob("*.txt"))) == N
    assert "cold / warm" in proc.stderr  # the summary went to stderr
