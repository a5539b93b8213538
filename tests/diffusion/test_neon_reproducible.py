"""`neon selftrain` is reproducible: one seed gives bit-identical fine-tuned weights with workers 0 and 2 (the
samples, the noise and timesteps of the denoising loss), another seed other weights, and a run killed with SIGKILL
part-way and resumed ends with the weights of the run that was never killed."""

from __future__ import annotations

import pytest
from _repro import assert_same_weights, checkpoint_step, cli_ok, differing, kill_after_step
from typer.testing import CliRunner

from vision.cli import app

runner = CliRunner()
WEIGHTS = "train/checkpoints/last/model.safetensors"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_ddpm):
    root = tmp_path_factory.mktemp("neon")
    tiny_ddpm(root / "base", num_train_timesteps=20)
    args = ["neon", "selftrain", "--model", str(root / "base"), "--num-samples", "8", "--max-steps", "6",
            "--save-every", "2", "--batch", "4", "--num-inference-steps", "3", "--device", "cpu"]
    ref = root / "ref"
    cli_ok(*args, "--out", str(ref), "--workers", "0")
    return args, ref


def test_same_seed_same_weights_any_worker_count_other_seed_other_weights(setup, tmp_path):
    args, ref = setup
    cli_ok(*args, "--out", str(tmp_path / "w2"), "--workers", "2")
    assert_same_weights(ref, tmp_path / "w2", WEIGHTS)
    cli_ok(*args, "--out", str(tmp_path / "seed1"), "--workers", "0", "--seed", "1")
    assert differing(ref, tmp_path / "seed1", WEIGHTS)


@pytest.mark.parametrize(("workers", "kill_at"), [("0", 3), ("2", 5)])
def test_killed_then_resumed_equals_never_killed(setup, tmp_path, workers, kill_at):
    args, ref = setup
    run = tmp_path / "run"
    kill_after_step([*args, "--out", str(run), "--workers", workers], kill_at, tmp_path)
    assert checkpoint_step(run, "train") == kill_at - 1
    cli_ok(*args[:4], "--out", str(run), "--resume")  # the base model; the rest is the run's own
    assert_same_weights(ref, run, WEIGHTS)


def test_resume_refuses_a_changed_option(setup):
    args, ref = setup
    r = runner.invoke(app, [*args[:4], "--out", str(ref), "--resume", "--lr", "0.5"])
    assert r.exit_code == 2 and "--lr 0.5 differs from the run's 0.0001" in r.output
