"""Smoke test of benchmarks/dcar_retrieval.py: tiny sizes, one epoch each, one seed; the JSON line parses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_dcar_benchmark_smoke():
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "dcar_retrieval.py"), "--n-pretrain", "64",
         "--n-train", "32", "--n-val", "16", "--n-test", "24", "--pretrain-epochs", "1", "--sup-epochs", "1", "--epochs", "1", "--seeds", "1",
         "--shift", "bright", "--threads", "1", "--ceiling", "--ceiling-epochs", "1"],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["benchmark"] == "dcar_retrieval" and "bright" in out["data"]
    assert set(out["results"]) == {"frozen", "coop", "dcar", "finetune_image_tower", "finetune_text_tower"}
    for r in out["results"].values():
        assert 0.0 <= r["i2t_R@1"] <= 100.0 and 0.0 <= r["t2i_R@1"] <= 100.0
        assert r["R@1"] == pytest.approx((r["i2t_R@1"] + r["t2i_R@1"]) / 2, abs=0.01)
    assert set(out["coop_beats_frozen_R@1"]) == {"i2t_R@1", "t2i_R@1", "R@1"}
    assert out["validation"]["n_val"] == 16 and "dcar_minus_frozen" in out
    assert out["pretrain"]["image_tower_supervised"]["seconds"] >= 0  # the supervised tower stage ran


def test_web_caption_is_a_partial_reordered_caption():
    import random

    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        from dcar_retrieval import web_caption
    finally:
        sys.path.pop(0)
    from clip_ood.dcar.data import Pair

    pair = Pair(image="x.png", caption="a red seven digit on a grass background", category="seven",
                attributes=["red digit", "grass background"])
    rng = random.Random(0)
    seen = set()
    for _ in range(200):
        parts = web_caption(pair, rng).split(", ")
        assert 1 <= len(parts) <= 3 and len(set(parts)) == len(parts)
        assert set(parts) <= {"seven", "red ink", "grass texture"}
        seen.add(tuple(parts))
    assert len(seen) == 15  # every non-empty ordered subset: 3 + 6 + 6
