"""Smoke test of benchmarks/perpneg_flow_fidelity.py: world, classifier, tiny SD3 flow generator and the
Perp-Neg / negative-prompt evaluation at toy size (--smoke); the JSON line parses, and a rerun reuses every stage."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "benchmarks" / "perpneg_flow_fidelity.py"
ROW_KEYS = {"row", "n", "digit_kept", "colour_removed", "background_kept", "all_three", "prompt", "mode", "negative",
            "w", "seeds", "colours"}


def _run(out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--threads", "1"],
                          capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=150)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])


@pytest.mark.timeout(240)
def test_perpneg_flow_fidelity_smoke(tmp_path):
    out = _run(tmp_path)
    assert out["benchmark"] == "perpneg_flow_fidelity" and out["smoke"] is True and out["device"] == "cpu"
    assert set(out["classifier"]["held_out_acc"]) == {"digit", "colour", "background"}
    assert out["classifier"]["cached"] is False and out["generator"]["cached"] is False
    assert out["generator"]["steps_done"] == out["config"]["generator"]["steps"]
    assert out["w_selection"]["caption"] != out["reported"]["prompt"]  # w is never chosen on the reported caption
    assert out["w_selection"]["chosen_w"] in out["config"]["w_candidates"]
    assert out["w_selection"]["chosen_w_subtract"] in out["config"]["w_candidates"]
    for test in out["paired_same_seeds"].values():
        assert 0.0 <= test["digit_kept"]["mcnemar_exact_p"] <= 1.0
    rows = {r["row"]: r for r in out["table"]}
    assert {"a_cfg", "b_negative_prompt", "c_perpneg", "e_subtract_same_w", "f_subtract_own_w", "d_cfg",
            "d_negative_prompt", "d_perpneg", "d_subtract_own_w"} <= set(rows)
    for r in out["table"] + out["colour_open_prompt"]:
        assert ROW_KEYS <= set(r), r
        assert r["n"] == out["config"]["seeds"]
        for k in ("digit_kept", "colour_removed", "background_kept", "all_three"):
            assert 0.0 <= r[k] <= 1.0
    assert rows["b_negative_prompt"]["negative"] == "red" and rows["c_perpneg"]["w"] == out["w_selection"]["chosen_w"]
    assert rows["e_subtract_same_w"]["w"] == rows["c_perpneg"]["w"]
    assert {"world_s", "classifier_train_s", "generator_train_s", "evaluation_s", "total_s"} <= set(out["timings_s"])
    assert Path(out["grid"]).is_file() and (tmp_path / "world_preview.png").is_file()
    for name in ("generator.safetensors", "generator.json", "classifier.safetensors", "classifier.json"):
        assert (tmp_path / "assets" / name).is_file()

    again = _run(tmp_path)  # every stage cached: nothing retrained or resampled, same table
    assert again["classifier"]["cached"] is True and again["generator"]["cached"] is True
    assert again["samples_sampled_this_run"] == 0
    assert again["table"] == out["table"]
