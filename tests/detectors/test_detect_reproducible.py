"""`detect train` is reproducible: one seed gives bit-identical weights (workers 0 and 2, augmentation on, ATSS and
the FCOS / RetinaNet baselines), another seed other weights; a run killed with SIGKILL mid-epoch and resumed ends with
the weights of the run that was never killed; a finished run extends with --resume --epochs N; a changed option is
refused on resume."""

from __future__ import annotations

import json

import pytest
from _repro import assert_same_weights, checkpoint_step, cli_ok, differing, kill_after_step
from typer.testing import CliRunner

from vision.cli import app
from vision.engine.schedule import lr_multiplier

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/detectors/conftest.py

runner = CliRunner()
# 8 training images, batch 2: 4 steps an epoch; default augmentation (flip, scale jitter + crop, colour jitter)
TINY = ["--backbone", "resnet18", "--pretrained", "false", "--img-size", "64", "--batch", "2", "--fpn-channels", "32"]


def _train(data, out, *extra: str) -> None:
    cli_ok("detect", "train", "--data", data, "--out", out, *extra)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    r = runner.invoke(app, ["data", "make-digits", "--out", str(out), "--format", "yolo", "--n-train", "8",
                            "--n-val", "2", "--img-size", "64"])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def reference(digits, tmp_path_factory):
    """The uninterrupted run: 2 epochs, checkpoints every 2 steps, workers 0, seed 0."""
    run = tmp_path_factory.mktemp("ref") / "run"
    _train(digits, run, *TINY, "--epochs", "2", "--checkpoint-every", "2", "--workers", "0")
    return run


def test_same_seed_same_weights_any_worker_count_other_seed_other_weights(digits, reference, tmp_path):
    _train(digits, tmp_path / "w2", *TINY, "--epochs", "2", "--checkpoint-every", "2", "--workers", "2")
    assert_same_weights(reference, tmp_path / "w2")
    _train(digits, tmp_path / "again", *TINY, "--epochs", "2", "--workers", "0", "--deterministic")
    assert_same_weights(reference, tmp_path / "again")  # (the CPU kernels are deterministic without the flag)
    _train(digits, tmp_path / "seed1", *TINY, "--epochs", "2", "--workers", "0", "--seed", "1")
    assert differing(reference, tmp_path / "seed1")


@pytest.mark.parametrize("model", ["fcos", "retinanet"])
def test_the_baselines_are_reproducible_too(digits, tmp_path, model):
    args = [*TINY, "--model", model, "--max-steps", "3"]
    _train(digits, tmp_path / "a", *args, "--workers", "0")
    _train(digits, tmp_path / "b", *args, "--workers", "2")
    assert_same_weights(tmp_path / "a", tmp_path / "b")
    _train(digits, tmp_path / "c", *args, "--workers", "0", "--seed", "3")
    assert differing(tmp_path / "a", tmp_path / "c")


@pytest.mark.parametrize(("workers", "kill_at"), [("0", 3), ("2", 7)])
def test_killed_then_resumed_equals_never_killed(digits, reference, tmp_path, workers, kill_at):
    run = tmp_path / "run"
    kill_after_step(["detect", "train", "--data", str(digits), "--out", str(run), *TINY, "--epochs", "2",
                     "--checkpoint-every", "2", "--workers", workers], kill_at, tmp_path)
    assert checkpoint_step(run) == kill_at - 1  # killed part-way through an epoch, past a checkpoint
    # a bare --resume: every other option is the run's own (config.yaml)
    r = runner.invoke(app, ["detect", "train", "--data", str(digits), "--out", str(run), "--resume"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert "resuming with the run's options" in r.output and "--img-size 64" in r.output
    assert_same_weights(reference, run)


def test_a_finished_run_extends_to_more_epochs(digits, tmp_path):
    # constant lr: one epoch extended to two is the two-epoch run
    args = [*TINY, "--workers", "0", "--scheduler", "constant", "--warmup", "0"]
    _train(digits, tmp_path / "two", *args, "--epochs", "2")
    _train(digits, tmp_path / "one", *args, "--epochs", "1")
    _train(digits, tmp_path / "one", "--epochs", "2", "--resume")
    assert checkpoint_step(tmp_path / "one") == 8
    assert_same_weights(tmp_path / "two", tmp_path / "one")
    # cosine: the schedule is recomputed for the new total from the resumed step on (the old one ended at lr 0)
    _train(digits, tmp_path / "cos", *TINY, "--workers", "0", "--warmup", "0", "--epochs", "1")
    _train(digits, tmp_path / "cos", "--epochs", "2", "--resume")
    rows = [ln.split(",") for ln in (tmp_path / "cos" / "log.csv").read_text().splitlines()]
    head = rows[0]
    lr = {int(r[head.index("step")]): float(r[head.index("lr")]) for r in rows[1:]}
    assert lr[8] == pytest.approx(0.01 * lr_multiplier(7, 8, "cosine"), rel=1e-6) and lr[8] > 1e-4
    assert json.loads((tmp_path / "cos" / "config.json").read_text())["total_steps"] == 8


def test_resume_refuses_a_changed_option_unless_a_new_out(digits, reference, tmp_path):
    r = runner.invoke(app, ["detect", "train", "--data", str(digits), "--out", str(reference), "--resume",
                            "--img-size", "96"])
    assert r.exit_code == 2
    assert "--img-size 96 differs from the run's 64" in r.output and "config.yaml" in r.output
    r = runner.invoke(app, ["detect", "train", "--data", str(digits), "--out", str(reference), "--resume",
                            "--batch", "4"])
    assert r.exit_code == 2 and "--batch 4 differs from the run's 2" in r.output
    # a checkpoint of that run continued into a new run folder may change options
    new = tmp_path / "branch"
    r = runner.invoke(app, ["detect", "train", "--data", str(digits), "--out", str(new), "--resume",
                            str(reference / "checkpoints" / "last"), "--epochs", "3", "--lr", "0.001"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert checkpoint_step(new) == 12 and checkpoint_step(reference) == 8


def test_resume_names_a_broken_options_file(digits, tmp_path):
    run = tmp_path / "run"
    _train(digits, run, *TINY, "--max-steps", "1", "--workers", "0")
    (run / "config.yaml").write_text("img_size: [unclosed\n")
    r = runner.invoke(app, ["detect", "train", "--data", str(digits), "--out", str(run), "--resume"])
    assert r.exit_code == 2 and f"{run / 'config.yaml'}: cannot read the run's options" in r.output
    (run / "config.yaml").write_text("- a list\n")
    r = runner.invoke(app, ["detect", "train", "--data", str(digits), "--out", str(run), "--resume"])
    assert r.exit_code == 2 and "must be a YAML mapping" in r.output
    (run / "config.yaml").unlink()  # a run folder without one resumes with the command line as given
    r = runner.invoke(app, ["detect", "train", "--data", str(digits), "--out", str(run), "--resume", *TINY,
                            "--max-steps", "2", "--workers", "0"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert checkpoint_step(run) == 2
