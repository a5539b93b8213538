"""DDP worker for tests/vision/test_engine.py: interrupt + resume through the Trainer on 2 CPU processes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from vision.engine import TrainConfig, Trainer, TrainingInterrupted


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))


def main(out: str) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 3.0, 0.5])
    data = TensorDataset(x, y)
    holder: dict = {}

    def loss_fn(model, batch):
        xb, yb = batch
        loss = ((model(xb).squeeze(-1) - yb) ** 2).mean()
        tr = holder["trainer"]
        # a NaN on rank 1 only: every rank must skip that step or the ranks would diverge / hang
        if tr.global_step == 4 and tr.accelerator.process_index == 1:
            loss = loss * float("nan")
        return loss

    def stop_at_3(trainer, event, info):
        if event == "step_end" and info["step"] == 3:
            trainer.request_stop()

    cfg = TrainConfig(
        out_dir=out,
        batch_size=4,
        max_steps=8,
        lr=0.05,
        grad_accum=2,
        checkpoint_every=2,
        device="cpu",
        progress=False,
        log_every=1,
    )
    tr = Trainer(make_model(), data, cfg, loss_fn=loss_fn, callbacks=[stop_at_3])
    holder["trainer"] = tr
    try:
        tr.fit()
        raise SystemExit("expected an interruption at step 3")
    except TrainingInterrupted:
        pass
    tr = Trainer(make_model(), data, cfg, loss_fn=loss_fn)
    holder["trainer"] = tr
    summary = tr.fit(resume=True)
    rank = tr.accelerator.process_index
    params = {k: v.detach().cpu().clone() for k, v in tr.unwrapped_model.state_dict().items()}
    torch.save(params, Path(out) / f"params_rank{rank}.pt")
    (Path(out) / f"summary_rank{rank}.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main(sys.argv[1])
