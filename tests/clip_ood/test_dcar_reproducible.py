"""`retrieval train` is reproducible: one seed gives bit-identical prompts with workers 0 and 2 (DCAR: hard-negative
batches, swapped-class negatives, attribute reweighting), another seed other prompts, and a run killed with SIGKILL
mid-epoch and resumed ends with the prompts of the run that was never killed."""

from __future__ import annotations

import pytest
from _repro import assert_same_weights, checkpoint_step, cli_ok, differing, kill_after_step


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("captions")
    cli_ok("retrieval", "make-captions", "--out", str(d), "--n-train", "24", "--n-test", "4")
    # 24 pairs, batch 8: 3 steps an epoch, 6 in all
    args = ["retrieval", "train", "--model", f"local-dir:{tiny_model_dir}", "--data", str(d / "train.csv"),
            "--batch", "8", "--epochs", "2", "--lambda-attr", "0.5", "--checkpoint-every", "2", "--device", "cpu"]
    ref = tmp_path_factory.mktemp("ref") / "run"
    cli_ok(*args, "--out", str(ref), "--workers", "0")
    return args, ref


def test_same_seed_same_prompts_any_worker_count_other_seed_other_prompts(setup, tmp_path):
    args, ref = setup
    cli_ok(*args, "--out", str(tmp_path / "w2"), "--workers", "2")
    assert_same_weights(ref, tmp_path / "w2")
    cli_ok(*args, "--out", str(tmp_path / "seed1"), "--workers", "0", "--seed", "1")
    assert differing(ref, tmp_path / "seed1")


@pytest.mark.parametrize(("workers", "kill_at"), [("0", 3), ("2", 5)])
def test_killed_then_resumed_equals_never_killed(setup, tmp_path, workers, kill_at):
    args, ref = setup
    run = tmp_path / "run"
    kill_after_step([*args, "--out", str(run), "--workers", workers], kill_at, tmp_path)
    assert checkpoint_step(run) == kill_at - 1
    cli_ok(*args[:6], "--out", str(run), "--resume")  # model and data; the rest is the run's own
    assert_same_weights(ref, run)
