"""Tests of vision.engine: loss falls, exact kill-and-resume, NaN guard, SIGINT, atomic checkpoints, DDP, schedules."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from vision.engine import (
    CheckpointNotFoundError,
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    TrainingInterrupted,
    WeightsMismatchError,
    build_scheduler,
    load_model_weights,
    load_training_state,
    lr_multiplier,
    resolve_checkpoint,
    save_checkpoint_atomic,
)
from vision.engine import checkpoint as ckpt_mod

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------ toys


def make_data(n: int = 18) -> TensorDataset:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 3.0, 0.5]) + 0.3
    return TensorDataset(x, y)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    # dropout makes the result depend on the restored torch RNG state
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 1))


def mse_loss(model: nn.Module, batch) -> dict:
    x, y = batch
    loss = ((model(x).squeeze(-1) - y) ** 2).mean()
    return {"loss": loss, "abs": (model(x).squeeze(-1) - y).abs().mean().detach()}


def cfg(tmp: Path, **kw) -> TrainConfig:
    base = dict(out_dir=str(tmp), batch_size=4, epochs=3, lr=0.05, device="cpu", progress=False, log_every=1, eval_every=0)
    base.update(kw)
    return TrainConfig(**base)


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_tree(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_tree(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_tree(x, y)
    else:
        assert a == b


# ------------------------------------------------------------------------------------------------ tests


def test_loss_falls_and_outputs(tmp_path):
    data = make_data(32)
    x, y = data.tensors

    @torch.no_grad()
    def eval_fn(model):
        return {"mse": float(((model(x).squeeze(-1) - y) ** 2).mean())}

    model = make_model()
    before = eval_fn(model.eval())["mse"]
    events = []
    tr = Trainer(
        model,
        data,
        cfg(tmp_path, epochs=6, optimizer="adamw", lr=0.03, eval_every=2, log_every=2, batch_size=8),
        loss_fn=mse_loss,
        eval_fn=eval_fn,
        metric="mse",
        mode="min",
        extra_config={"task": "toy"},
        callbacks=[lambda t, ev, info: events.append(ev)],
    )
    summary = tr.fit()
    assert summary["steps"] == 24 and summary["best_metric"] < before / 3
    assert summary["last_metrics"]["mse"] == pytest.approx(summary["best_metric"])
    assert summary["images_per_s"] > 0 and summary["peak_memory_mb"] > 0
    assert {"fit_start", "step_end", "epoch_end", "eval", "checkpoint", "fit_end"} <= set(events)
    # files
    conf = json.loads((tmp_path / "config.json").read_text())
    assert conf["train"]["lr"] == 0.03 and conf["extra"] == {"task": "toy"}
    header = (tmp_path / "log.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["step", "epoch", "lr", "loss"] and "abs" in header and "images_per_s" in header
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 1 + 3
    last = tmp_path / "checkpoints" / "last"
    assert {p.name for p in last.iterdir()} == {"model.safetensors", "training_state.pt", "meta.json"}
    best = tmp_path / "checkpoints" / "best"
    assert json.loads((best / "metrics.json").read_text())["mse"] == pytest.approx(summary["best_metric"])
    fresh = make_model()
    load_model_weights(fresh, best / "model.safetensors")
    assert_same_tree(params(fresh), params(tr.unwrapped_model))  # best == last here: mse fell monotonically
    assert list((tmp_path / "tb").iterdir())


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_kill_and_resume_is_exact(tmp_path, grad_accum):
    # 18 samples / batch 4 = 5 batches per epoch; with grad_accum=2 -> 3 optimizer steps per epoch (2+2+1)
    kw = dict(epochs=3, grad_accum=grad_accum, optimizer="adamw", checkpoint_every=2, warmup_steps=2)
    ref = Trainer(make_model(), make_data(), cfg(tmp_path / "ref", **kw), loss_fn=mse_loss)
    ref.fit()
    crash_at = 5

    def crash(trainer, event, info):
        if event == "step_end" and info["step"] == crash_at:
            raise RuntimeError("simulated crash")

    out = tmp_path / "run"
    tr = Trainer(make_model(), make_data(), cfg(out, **kw), loss_fn=mse_loss, callbacks=[crash])
    with pytest.raises(RuntimeError, match="simulated crash"):
        tr.fit()
    meta = json.loads((out / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["step"] == 4 and meta["batch_in_epoch"] > 0  # resumes mid-epoch
    tr2 = Trainer(make_model(), make_data(), cfg(out, **kw), loss_fn=mse_loss)
    summary = tr2.fit(resume=True)
    assert summary["steps"] == ref.global_step == 3 * math.ceil(5 / grad_accum)
    assert_same_tree(params(tr2.unwrapped_model), params(ref.unwrapped_model))
    assert_same_tree(tr2.optimizer.state_dict(), ref.optimizer.state_dict())
    # the log rows past the checkpoint written by the crashed run were dropped, then rewritten
    steps = [int(r.split(",")[0]) for r in (out / "log.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, summary["steps"] + 1))


def test_nan_guard_skips_then_raises(tmp_path):
    holder: dict = {}
    nan_steps = {2, 3}

    def loss_fn(model, batch):
        out = mse_loss(model, batch)
        if holder["tr"].global_step in nan_steps:
            out["loss"] = out["loss"] * float("nan")
        return out

    snaps: dict[int, dict] = {}

    def snap(trainer, event, info):
        if event == "step_end":
            snaps[info["step"]] = params(trainer.unwrapped_model)

    model = make_model()
    tr = Trainer(
        model, make_data(), cfg(tmp_path / "a", max_steps=6, scheduler="constant"), loss_fn=loss_fn, callbacks=[snap],
    )  # fmt: skip
    holder["tr"] = tr
    summary = tr.fit()
    assert summary["skipped_steps"] == 2
    assert_same_tree(snaps[3], snaps[2])  # steps 3 and 4 (0-based 2 and 3) changed nothing
    assert_same_tree(snaps[4], snaps[2])
    assert not torch.equal(snaps[5]["0.weight"], snaps[4]["0.weight"])
    assert all(torch.isfinite(v).all() for v in snaps[6].values())

    nan_steps.update(range(100))
    tr = Trainer(
        make_model(),
        make_data(),
        cfg(tmp_path / "b", max_steps=20, max_bad_steps=3),
        loss_fn=loss_fn,
    )
    holder["tr"] = tr
    with pytest.raises(NonFiniteLossError, match=r"3 optimizer steps in a row.*step 3.*lower learning rate"):
        tr.fit()


class _NotHandled(Exception):
    pass


@pytest.mark.parametrize("stop_at", [2, 3])  # 3 = last step of epoch 0: its eval must still happen once
def test_sigint_leaves_resumable_checkpoint(tmp_path, stop_at):
    def fallback(signum, frame):  # if the trainer did not catch SIGINT, fail this test, not the session
        raise _NotHandled

    data = make_data()
    x, y = data.tensors

    @torch.no_grad()
    def eval_fn(model):
        return {"mse": float(((model(x).squeeze(-1) - y) ** 2).mean())}

    kw = dict(epochs=2, grad_accum=2, eval_every=1)
    ref = Trainer(
        make_model(), data, cfg(tmp_path / "ref", **kw), loss_fn=mse_loss, eval_fn=eval_fn
    )
    ref.fit()

    def send_sigint(trainer, event, info):
        if event == "step_end" and info["step"] == stop_at:
            signal.raise_signal(signal.SIGINT)  # delivered to this (main) thread before returning

    old = signal.signal(signal.SIGINT, fallback)
    try:
        out = tmp_path / "run"
        tr = Trainer(
            make_model(),
            data,
            cfg(out, **kw),
            loss_fn=mse_loss,
            eval_fn=eval_fn,
            callbacks=[send_sigint],
        )
        with pytest.raises(TrainingInterrupted, match="resume with --resume") as info:
            tr.fit()
        assert isinstance(info.value, KeyboardInterrupt)
        assert signal.getsignal(signal.SIGINT) is fallback  # handlers restored
        state = load_training_state(info.value.checkpoint)
        assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (
            stop_at,
            0,
            {2: 4, 3: 5}[stop_at],  # batches consumed (5 per epoch)
        )
        tr2 = Trainer(make_model(), data, cfg(out, **kw), loss_fn=mse_loss, eval_fn=eval_fn)
        summary = tr2.fit(resume=True)
    finally:
        signal.signal(signal.SIGINT, old)
    assert summary["steps"] == ref.global_step == 6
    fresh = make_model()
    load_model_weights(fresh, out / "checkpoints" / "last")
    assert_same_tree(params(fresh), params(ref.unwrapped_model))
    assert (out / "metrics.csv").read_text() == (tmp_path / "ref" / "metrics.csv").read_text()


def test_resume_without_checkpoint_names_path(tmp_path):
    tr = Trainer(make_model(), make_data(), cfg(tmp_path), loss_fn=mse_loss)
    with pytest.raises(CheckpointNotFoundError, match=str(tmp_path / "checkpoints" / "last")):
        tr.fit(resume=True)
    with pytest.raises(CheckpointNotFoundError, match="nowhere"):
        tr.fit(resume=str(tmp_path / "nowhere"))


def test_atomic_checkpoint_survives_failed_save(tmp_path, monkeypatch):
    d = tmp_path / "ck" / "last"
    m1 = make_model()
    save_checkpoint_atomic(d, m1, {"step": 1}, meta={"step": 1})
    m2 = make_model()
    with torch.no_grad():
        for p in m2.parameters():
            p.add_(1.0)

    def boom(*a, **k):
        raise OSError("disk full")

    for target in ("save_file", "torch_save"):
        with monkeypatch.context() as mp:
            if target == "save_file":
                mp.setattr(ckpt_mod, "save_file", boom)
            else:
                mp.setattr(ckpt_mod.torch, "save", boom)
            with pytest.raises(OSError, match="disk full"):
                save_checkpoint_atomic(d, m2, {"step": 2}, meta={"step": 2})
        assert sorted(p.name for p in d.parent.iterdir()) == ["last"]  # no temp dirs left behind
        assert json.loads((d / "meta.json").read_text())["step"] == 1
        assert load_training_state(d)["step"] == 1
        fresh = make_model()
        load_model_weights(fresh, d / "model.safetensors")
        assert_same_tree(params(fresh), params(m1))

    # through the Trainer: the 3rd save fails, the checkpoint of the 2nd save stays usable
    calls = {"n": 0}
    real = ckpt_mod.save_file

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real(*a, **k)

    monkeypatch.setattr(ckpt_mod, "save_file", flaky)
    out = tmp_path / "train"
    tr = Trainer(
        make_model(), make_data(), cfg(out, checkpoint_every=1, keep_last=2), loss_fn=mse_loss
    )
    with pytest.raises(OSError, match="disk full"):
        tr.fit()
    assert load_training_state(out / "checkpoints" / "last")["step"] == 2
    assert (out / "checkpoints" / "step-0000001" / "meta.json").exists()  # keep_last=2 keeps one older copy

    # a crash between "move old aside" and "move new in" is repaired on resume
    last = out / "checkpoints" / "last"
    os.replace(last, out / "checkpoints" / "last.trash-deadbeef")
    assert resolve_checkpoint(last) == last and (last / "meta.json").exists()


def test_load_model_weights_formats_and_errors(tmp_path):
    model = make_model()
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "w.pth")
    fresh = make_model()
    with torch.no_grad():
        fresh[0].weight.zero_()
    load_model_weights(fresh, tmp_path / "w.pth")  # nested dict + DDP prefix
    assert_same_tree(params(fresh), params(model))

    sd = model.state_dict()
    sd.pop("0.bias")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(
        WeightsMismatchError, match=r"(?s)missing keys \(1\): 0\.bias.*unexpected keys \(1\): extra"
    ):
        load_model_weights(make_model(), tmp_path / "bad.pt")
    missing, unexpected = load_model_weights(make_model(), tmp_path / "bad.pt", strict=False)
    assert missing == ["0.bias"] and unexpected == ["extra.weight"]

    class Tied(nn.Module):  # shared tensors are saved (cloned) and load back
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 3)
            self.b.weight = self.a.weight

    t = Tied()
    save_checkpoint_atomic(tmp_path / "tied", t, None)
    t2 = Tied()
    load_model_weights(t2, tmp_path / "tied")
    assert torch.equal(t2.a.weight, t.a.weight) and t2.b.weight is t2.a.weight


def test_schedules():
    kw = dict(warmup_steps=10, warmup_factor=0.001)
    assert lr_multiplier(0, 110, "cosine", **kw) == pytest.approx(0.001)
    assert lr_multiplier(5, 110, "cosine", **kw) == pytest.approx(0.001 + 0.999 * 0.5)
    assert lr_multiplier(10, 110, "cosine", **kw) == pytest.approx(1.0)
    assert lr_multiplier(60, 110, "cosine", **kw) == pytest.approx(0.5)
    assert lr_multiplier(110, 110, "cosine", **kw) == pytest.approx(0.0, abs=1e-12)
    # mmdet 1x: 12 "epochs" -> drops after 8 and 11
    assert [lr_multiplier(s, 12, "step") for s in (0, 7, 8, 10, 11)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    assert lr_multiplier(3, 12, "step", warmup_steps=6, warmup_factor=0.0) == pytest.approx(0.5)
    assert lr_multiplier(50, 100, "constant", warmup_steps=10) == 1.0
    with pytest.raises(ValueError):
        lr_multiplier(0, 10, "poly")

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.2)
    sched = build_scheduler(opt, 12, "step", warmup_steps=2, warmup_factor=0.1)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert (
        lrs[0] == pytest.approx(0.02) and lrs[1] == pytest.approx(0.2 * 0.55) and lrs[2] == pytest.approx(0.2)
    )
    assert lrs[8] == pytest.approx(0.02) and lrs[11] == pytest.approx(0.002)


def test_trainer_lr_follows_schedule(tmp_path):
    seen = {}
    tr = Trainer(
        make_model(), make_data(16), cfg(tmp_path, epochs=2, warmup_steps=3, lr=0.1), loss_fn=mse_loss, callbacks=[lambda t, ev, info: seen.__setitem__(info["step"], info["lr"]) if ev == "step_end" else None],
    )  # fmt: skip
    tr.fit()
    assert tr.total_steps == 8
    for step, lr in seen.items():
        assert lr == pytest.approx(0.1 * lr_multiplier(step - 1, 8, "cosine", warmup_steps=3))


@pytest.mark.slow
def test_ddp_two_processes_cpu(tmp_path):
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(REPO / "tests" / "vision" / "_ddp_worker.py"), str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summaries = [json.loads((tmp_path / f"summary_rank{r}.json").read_text()) for r in (0, 1)]
    for s in summaries:
        assert s["num_processes"] == 2 and s["steps"] == 8 and s["skipped_steps"] == 1
    assert (tmp_path / "checkpoints" / "last" / "model.safetensors").exists()
    p0 = torch.load(tmp_path / "params_rank0.pt", weights_only=True)
    p1 = torch.load(tmp_path / "params_rank1.pt", weights_only=True)
    assert_same_tree(p0, p1)
    fresh = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    load_model_weights(fresh, tmp_path / "checkpoints" / "last")
    assert_same_tree(params(fresh), p0)
    assert "interrupted at step 3" in proc.stderr + proc.stdout


def test_loss_fn_and_eval_fn_may_take_the_loop_context(tmp_path):
    from vision.engine import LossContext

    seen, evals = [], []

    def loss3(model, batch, ctx: LossContext):
        seen.append((ctx.epoch, ctx.step, ctx.total_steps, ctx.batch_in_epoch))
        x, y = batch
        return ((model(x).squeeze(-1) - y) ** 2).mean()

    def eval2(model, ctx: LossContext):
        evals.append((ctx.epoch, ctx.step, ctx.trainer.global_step))
        return {"m": 1.0}

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 4, generator=g)
    data = TensorDataset(x, x.sum(1))
    cfg = TrainConfig(out_dir=str(tmp_path), batch_size=4, epochs=2, lr=0.01, device="cpu", progress=False, eval_every=1)
    Trainer(nn.Linear(4, 1), data, cfg, loss_fn=loss3, eval_fn=eval2, metric="m").fit()
    assert seen == [(0, 0, 4, 0), (0, 1, 4, 1), (1, 2, 4, 0), (1, 3, 4, 1)]
    assert evals == [(1, 2, 2), (2, 4, 4)]
