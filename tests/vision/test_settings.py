"""Task settings as objects: TrainConfig's task-defaulted fields, RunOptions, the SegDec presets and the rule that
fills a run's schedule (preset, registry trunk), the CLI's RunOptions."""

from __future__ import annotations

import dataclasses

import pytest
import typer
from typer.testing import CliRunner

from vision import cli_options as opt
from vision.engine.config import ENGINE_DEFAULTS, RunOptions, TrainConfig


def test_unset_fields_take_the_task_default_then_the_engine_default():
    t = TrainConfig(lr=0.5)
    assert t.epochs is None and not t.is_set("epochs") and t.is_set("lr")
    r = t.resolved(epochs=12, lr=0.01, optimizer=None)
    assert (r.epochs, r.lr, r.optimizer, r.momentum) == (12, 0.5, "sgd", 0.9)  # given > task > engine
    assert t.epochs is None  # a copy
    full = TrainConfig().resolved()
    assert {k: getattr(full, k) for k in ENGINE_DEFAULTS} == ENGINE_DEFAULTS
    with pytest.raises(TypeError, match="no task default"):
        t.resolved(seed=3)
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lbfgs")


def test_run_options_fill_the_train_config_fields_a_run_sets(tmp_path):
    run = RunOptions(out=tmp_path / "r", device="cpu", progress=False, keep_last=3, workers=2, config={"a": 1})
    t = dataclasses.replace(TrainConfig(), **run.train_fields(run.out))
    assert (t.out_dir, t.device, t.progress, t.keep_last, t.num_workers) == (str(tmp_path / "r"), "cpu", False, 3, 2)
    d = run.to_dict()
    assert d["out"] == str(tmp_path / "r") and "config" not in d


def test_segdec_presets_are_config_and_schedule_pairs():
    from detectors.segdec.config import PRESETS, SegDecConfig, preset_train_defaults

    cfg, train = PRESETS["dagm"]
    assert isinstance(cfg, SegDecConfig) and isinstance(train, TrainConfig)
    assert (cfg.img_size, cfg.dilate, train.epochs, train.lr, train.batch_size) == ("512x512", 7, 70, 0.05, 1)
    assert preset_train_defaults("severstal")["batch_size"] == 10 and preset_train_defaults("ksdd")["momentum"] == 0.0
    r = SegDecConfig(delta=0.5).resolved("ksdd")
    assert (r.delta, r.p, r.w_pos, r.img_size) == (0.5, 2.0, 1.0, "512x1408")  # a given value beats the preset
    with pytest.raises(ValueError, match="no preset"):
        SegDecConfig().resolved("mvtec")


def test_cli_builds_run_options_once_from_the_shared_options(tmp_path):
    app = typer.Typer()
    seen = {}

    @app.command()
    def train(ctx: typer.Context, out: str = opt.out_option(None), device: str | None = opt.device_option(),
              cpu: bool = opt.cpu_option(), resume: str | None = opt.resume_option(),
              workers: int = opt.workers_option(3), seed: int = opt.seed_option()) -> None:
        seen["run"] = opt.run_options(ctx)

    r = CliRunner().invoke(app, ["--out", str(tmp_path / "x"), "--cpu", "--seed", "4"])
    assert r.exit_code == 0, r.output
    run = seen["run"]
    assert (str(run.out), run.device, run.workers, run.resume, run.exist_ok) == (str(tmp_path / "x"), "cpu", 3,
                                                                                  False, False)
    assert run.config["seed"] == 4 and run.config["workers"] == 3  # the command's options: config.yaml
    r = CliRunner().invoke(app, ["--out", "y", "--device", "tpu"])
    assert r.exit_code == 2 and "--device 'tpu'" in r.output


def test_an_interrupted_training_command_exits_130_with_the_resume_hint(monkeypatch, tmp_path):
    import detectors.segdec.train as segdec_train
    from detectors.segdec.cli import app as defect_app
    from vision.data.defects import make_defects
    from vision.engine import TrainingInterrupted

    def stopped(*a, **k):
        raise TrainingInterrupted("stopped by SIGINT at step 3; saved checkpoints/last")

    monkeypatch.setattr(segdec_train, "train_segdec", stopped)
    data = make_defects(tmp_path / "d", n_train=4, n_test=0, img_size=32, seed=0)
    r = CliRunner().invoke(defect_app, ["train", "--data", str(data), "--out", str(tmp_path / "r"), "--cpu"])
    assert r.exit_code == 130
    assert "saved checkpoints/last (negvision defect train ... --resume)" in r.output
