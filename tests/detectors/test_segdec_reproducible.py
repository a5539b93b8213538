"""`defect train` is reproducible: one seed gives bit-identical weights with workers 0 and 2 (augmentation and the
frequency-of-use sampler on), another seed other weights, and a run killed with SIGKILL mid-epoch and resumed ends
with the weights of the run that was never killed."""

from __future__ import annotations

import pytest
from _repro import assert_same_weights, checkpoint_step, cli_ok, differing, kill_after_step
from typer.testing import CliRunner

from vision.cli import app
from vision.data.defects import make_defects

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/detectors/conftest.py

runner = CliRunner()
# mixed supervision (some defective images keep masks), the paper's trunk with the decision's statistics branch,
# augmentation on; 6 defective + 6 sampled good images a balanced epoch, batch 4: 3 steps an epoch, 6 in all
ARGS = ["--width", "0.25", "--cpu", "--batch", "4", "--epochs", "2", "--augment", "--num-segmented", "4",
        "--backbone", "paper", "--stats-head", "--checkpoint-every", "2", "--eval-every", "1"]


def _train(data, out, *extra: str) -> None:
    cli_ok("defect", "train", "--data", data, "--out", out, *extra)


@pytest.fixture(scope="module")
def defects(tmp_path_factory):
    return make_defects(tmp_path_factory.mktemp("defects") / "set", n_train=16, n_test=4, img_size=32, seed=0)


@pytest.fixture(scope="module")
def reference(defects, tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    _train(defects, run, *ARGS, "--workers", "0")
    return run


def test_same_seed_same_weights_any_worker_count_other_seed_other_weights(defects, reference, tmp_path):
    _train(defects, tmp_path / "w2", *ARGS, "--workers", "2")
    assert_same_weights(reference, tmp_path / "w2")
    _train(defects, tmp_path / "seed1", *ARGS, "--workers", "0", "--seed", "1")
    assert differing(reference, tmp_path / "seed1")


@pytest.mark.parametrize(("workers", "kill_at"), [("0", 3), ("2", 5)])
def test_killed_then_resumed_equals_never_killed(defects, reference, tmp_path, workers, kill_at):
    run = tmp_path / "run"
    kill_after_step(["defect", "train", "--data", str(defects), "--out", str(run), *ARGS, "--workers", workers],
                    kill_at, tmp_path)
    assert checkpoint_step(run) == kill_at - 1
    r = runner.invoke(app, ["defect", "train", "--data", str(defects), "--out", str(run), "--resume"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert_same_weights(reference, run)


def test_resume_refuses_a_changed_option(defects, reference):
    r = runner.invoke(app, ["defect", "train", "--data", str(defects), "--out", str(reference), "--resume",
                            "--width", "0.5"])
    assert r.exit_code == 2 and "--width 0.5 differs from the run's 0.25" in r.output
