"""Training curves (curves.png) from a run folder's log.csv / metrics.csv, and the Trainer writing them."""

from __future__ import annotations

import logging
import math
import os

os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

from vision.engine import TrainConfig, Trainer
from vision.engine import curves as curves_mod
from vision.engine.curves import plot_training_curves, read_numeric_csv, try_plot_training_curves

LOG_HEADER = "step,epoch,lr,loss,loss_cls,images_per_s,time\n"


def _write(path, text: str) -> None:
    path.write_text(text)


def _panels(path) -> tuple[int, int]:
    """(columns, rows) of panels, from the picture size (4.2 x 3.0 inches per panel at 100 dpi)."""
    w, h = Image.open(path).size
    return round(w / 420), round(h / 300)


def _log(n: int) -> str:
    rows = [f"{s},{s // 10},{0.01 * (1 - s / n):.6g},{2 * math.exp(-s / 10) + 0.1:.6g},{math.exp(-s / 10):.6g},"
            f"100,{0.1 * s:.3g}\n" for s in range(1, n + 1)]
    return LOG_HEADER + "".join(rows)


def test_read_numeric_csv_skips_junk(tmp_path) -> None:
    p = tmp_path / "log.csv"
    _write(p, LOG_HEADER + "2,0,0.01,1.5,0.5,10,1\n"
              "garbage,row\n"  # junk: step not a number -> dropped
              "step,epoch,lr,loss,loss_cls,images_per_s,time\n"  # a repeated header -> dropped
              "1,0,0.01,nan,abc,10,1\n"  # nan and non-numeric cells -> nan
              "3,0,0.01,inf,0.25\n")  # short row padded with nan; inf -> nan
    cols = read_numeric_csv(p)
    assert cols["step"].tolist() == [1.0, 2.0, 3.0]  # sorted by step
    assert np.isnan(cols["loss"][[0, 2]]).all() and cols["loss"][1] == 1.5
    assert np.isnan(cols["loss_cls"][0]) and cols["loss_cls"][2] == 0.25
    assert np.isnan(cols["time"][2])
    assert read_numeric_csv(tmp_path / "missing.csv") == {}
    _write(tmp_path / "empty.csv", "")
    _write(tmp_path / "header.csv", LOG_HEADER)
    assert read_numeric_csv(tmp_path / "empty.csv") == {} and read_numeric_csv(tmp_path / "header.csv") == {}


def test_plot_training_curves_panels(tmp_path) -> None:
    _write(tmp_path / "log.csv", _log(50) + "junk,,\n")
    _write(tmp_path / "metrics.csv", "step,epoch,AP,AP50\n10,1,0.1,0.2\nbad line\n20,2,0.2,nan\n30,3,0.3,0.4\n")
    path = plot_training_curves(tmp_path)
    assert path == tmp_path / "curves.png" and path.exists()
    # loss, loss_cls, lr, AP, AP50 -> 5 panels in 3 columns, 2 rows
    assert _panels(path) == (3, 2)
    assert np.asarray(Image.open(path).convert("L")).std() > 10
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # atomic write leaves no temp file


def test_plot_training_curves_robust(tmp_path) -> None:
    assert plot_training_curves(tmp_path) is None  # no files
    _write(tmp_path / "log.csv", "")
    _write(tmp_path / "metrics.csv", "step,epoch,acc\n")
    assert plot_training_curves(tmp_path) is None and not (tmp_path / "curves.png").exists()
    # a single row; an all-nan column gets no (empty) panel
    _write(tmp_path / "log.csv", LOG_HEADER + "1,0,0.01,0.9,nan,10,1\n")
    assert _panels(plot_training_curves(tmp_path)) == (2, 1)  # loss, lr
    # only metrics.csv
    (tmp_path / "log.csv").unlink()
    _write(tmp_path / "metrics.csv", "step,epoch,acc\n5,1,0.5\n")
    assert _panels(plot_training_curves(tmp_path)) == (1, 1)
    # nothing numeric at all
    _write(tmp_path / "metrics.csv", "step,epoch,acc\nx,y,z\n")
    (tmp_path / "curves.png").unlink()
    assert plot_training_curves(tmp_path) is None


def test_try_plot_only_warns(tmp_path, monkeypatch, caplog) -> None:
    def boom(out_dir):
        raise RuntimeError("no display")

    monkeypatch.setattr(curves_mod, "plot_training_curves", boom)
    with caplog.at_level(logging.WARNING, logger="negvision.engine"):
        assert try_plot_training_curves(tmp_path) is None
    assert "could not draw training curves" in caplog.text and "no display" in caplog.text


def _data(n: int = 16) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x @ torch.tensor([1.0, -2.0, 3.0, 0.5]))


def _loss(model, batch) -> dict:
    x, y = batch
    err = model(x).squeeze(-1) - y
    return {"loss": (err**2).mean(), "abs": err.abs().mean().detach()}


def _cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(out_dir=str(tmp_path), batch_size=4, epochs=3, lr=0.05, device="cpu", progress=False, log_every=1, eval_every=1)
    base.update(kw)
    return TrainConfig(**base)


def test_trainer_writes_curves(tmp_path) -> None:
    data = _data()
    x, y = data.tensors
    torch.manual_seed(0)
    seen = []

    def eval_fn(model):
        seen.append((tmp_path / "curves.png").exists())
        return {"mse": float(((model(x).squeeze(-1) - y) ** 2).mean())}

    tr = Trainer(nn.Linear(4, 1), data, _cfg(tmp_path), loss_fn=_loss, eval_fn=eval_fn)
    tr.fit()
    assert seen == [False, True, True]  # drawn after each evaluation...
    path = tmp_path / "curves.png"
    assert _panels(path) == (3, 2)  # ...and at the end: loss, abs, lr, eval mse


def test_trainer_survives_a_failing_plot(tmp_path, monkeypatch, caplog) -> None:
    def boom(out_dir):
        raise RuntimeError("broken matplotlib")

    monkeypatch.setattr(curves_mod, "plot_training_curves", boom)
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="negvision.engine"):
        summary = Trainer(nn.Linear(4, 1), _data(), _cfg(tmp_path, epochs=1, eval_every=0, batch_size=8),
                          loss_fn=_loss).fit()
    assert summary["steps"] == 2 and (tmp_path / "summary.json").exists()
    assert "broken matplotlib" in caplog.text and not (tmp_path / "curves.png").exists()


def test_fifty_step_log(tmp_path) -> None:
    _write(tmp_path / "log.csv", _log(50))
    assert _panels(plot_training_curves(tmp_path)) == (3, 1)  # loss, loss_cls, lr
