"""Smoke test of benchmarks/ood_throughput.py, ood_api_load.py and ood_api_soak.py with tiny settings: one JSON line each.

Run in process (runpy) so torch / open_clip are not imported again for each script.
"""

import json
import runpy
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(script, *args, capsys=None):
    argv = sys.argv
    sys.argv = [script, *args]
    try:
        runpy.run_path(str(REPO / "benchmarks" / script), run_name="__main__")
    finally:
        sys.argv = argv
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines
    return json.loads(lines[0])


@pytest.mark.timeout(160)
def test_ood_throughput_smoke(capsys):
    out = _run("ood_throughput.py", "--model", "tiny", "--batch-size", "4", "--num-negatives", "500",
               "--num-classes", "10", "--repeats", "1", capsys=capsys)
    assert out["benchmark"] == "ood_throughput" and out["num_negatives"] == 500
    assert out["encoder_ms_per_batch"] > 0 and out["neglabel_ms_per_batch"] > 0 and "scoring_overhead_pct" in out


@pytest.mark.timeout(160)
def test_ood_api_load_smoke(capsys):
    out = _run("ood_api_load.py", "--requests", "4", "--concurrency", "1,2", "--num-negatives", "50",
               "--num-classes", "5", capsys=capsys)
    assert out["host"] == "127.0.0.1"
    for mode in ("micro_batched", "one_request_one_forward"):
        assert [r["concurrency"] for r in out[mode]] == [1, 2]
        assert all(r["errors"] == 0 and r["requests"] == 4 and r["p99_ms"] >= r["p50_ms"] > 0 for r in out[mode])
    assert set(out["rps_speedup_batched_vs_single"]) == {"1", "2"}


@pytest.mark.timeout(200)
def test_ood_api_soak_smoke(capsys):
    """The soak script against a real server process, a few seconds: every kind of upload answered, no 5xx."""
    out = _run("ood_api_soak.py", "--clients", "4", "--duration", "3", capsys=capsys)
    assert out["benchmark"] == "ood_api_soak" and out["requests"] > 0 and out["n_5xx"] == 0
    assert out["readyz_after"] == 200 and out["rss_peak_mb"] >= out["rss_idle_mb"] * 0.5 > 0
    assert out["healthz_probes"] > 0 and out["healthz_p99_ms"] >= out["healthz_p50_ms"]
    wanted = {"valid": "200", "oversize_image": "413", "oversize_request": "413", "not_image": "415", "truncated": "400"}
    for kind, codes in out["status_by_kind"].items():
        assert set(codes) == {wanted[kind]}, (kind, codes)
