"""Training curves: ``log.csv`` (losses, lr) and ``metrics.csv`` (eval metrics) of a run folder drawn as curves.png."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import numpy as np

logger = logging.getLogger("negvision.engine")

# log.csv columns that are not losses (each loss and loss component gets its own panel; lr gets one too)
_NOT_LOSS = ("step", "epoch", "lr", "images_per_s", "time")


def _float(text: str) -> float:
    try:
        v = float(text)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def read_numeric_csv(path: Path) -> dict[str, np.ndarray]:
    """Columns of a CSV as float arrays (non-numeric or non-finite cells -> nan), sorted by ``step``.

    Rows whose ``step`` is not a number (junk, a repeated header) are dropped; a missing or empty file gives {}.
    """
    try:
        with open(path, newline="", errors="replace") as f:
            rows = [r for r in csv.reader(f) if r]
    except (FileNotFoundError, IsADirectoryError, csv.Error):
        return {}
    if len(rows) < 2:
        return {}
    header = [h.strip() for h in rows[0]]
    table = np.array([[_float(r[j]) if j < len(r) else math.nan for j in range(len(header))] for r in rows[1:]],
                     dtype=np.float64).reshape(-1, len(header))
    if "step" in header:
        step = table[:, header.index("step")]
        table = table[np.isfinite(step)]
        table = table[np.argsort(table[:, header.index("step")], kind="stable")]
    cols = {h: table[:, j] for j, h in enumerate(header) if h}
    if "step" not in cols:
        cols["step"] = np.arange(len(table), dtype=np.float64)
    return cols if len(table) else {}


def _smooth(y: np.ndarray) -> np.ndarray:
    """Centred moving average over about 1/25 of the points (at most 51), ignoring nan."""
    half = int(np.clip(round(len(y) / 50), 1, 25))
    kernel = np.ones(2 * half + 1)
    ok = np.isfinite(y)
    num = np.convolve(np.where(ok, y, 0.0), kernel, mode="same")
    den = np.convolve(ok.astype(np.float64), kernel, mode="same")
    out = np.divide(num, den, out=np.full_like(y, np.nan), where=den > 0)
    out[~ok] = np.nan
    return out


def plot_training_curves(out_dir: Path) -> Path | None:
    """Write ``out_dir/curves.png`` from ``log.csv`` and ``metrics.csv``; None when neither has a number to draw.

    One panel per loss column (raw thin line and a smoothed line; log y-axis when it spans over 100x), one for lr,
    one per eval metric (markers), all against step.
    """
    from vision.viz import new_figure, save_figure

    out_dir = Path(out_dir)
    log = read_numeric_csv(out_dir / "log.csv")
    metrics = read_numeric_csv(out_dir / "metrics.csv")
    panels: list[tuple[str, str, np.ndarray, np.ndarray]] = []  # (kind, name, x, y)
    if log:
        losses = [k for k in log if k not in _NOT_LOSS]
        losses.sort(key=lambda k: k != "loss")  # the total loss first, components in file order
        panels += [("loss", k, log["step"], log[k]) for k in losses]
        if "lr" in log:
            panels.append(("lr", "lr", log["step"], log["lr"]))
    if metrics:
        panels += [("metric", k, metrics["step"], metrics[k]) for k in metrics if k not in ("step", "epoch")]
    panels = [p for p in panels if np.isfinite(p[3]).any()]
    if not panels:
        return None

    steps = np.concatenate([x[np.isfinite(y)] for _, _, x, y in panels])
    x_lo, x_hi = float(steps.min()), float(steps.max())  # one step range for every panel
    ncols = min(len(panels), 3 if len(panels) <= 9 else 4)
    nrows = math.ceil(len(panels) / ncols)
    fig = new_figure((4.2 * ncols, 3.0 * nrows))
    for i, (kind, name, x, y) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ok = np.isfinite(y)
        last = y[ok][-1]
        few = ok.sum() < 30
        if kind == "loss":
            ax.plot(x, y, color="tab:blue", lw=0.8, alpha=0.45, marker="o" if few else None, ms=3, label="raw")
            if ok.sum() >= 8:
                ax.plot(x, _smooth(y), color="tab:orange", lw=2.0, label="smoothed")
                ax.legend(fontsize="x-small", loc="upper right")
            lo, hi = float(np.nanmin(y)), float(np.nanmax(y))
            log_y = lo > 0 and hi / lo > 100  # a loss falling over orders of magnitude reads better on a log axis
            if log_y:
                ax.set_yscale("log")
            title = f"{name} (last {last:.4g}{'; log scale' if log_y else ''})"
        elif kind == "lr":
            ax.plot(x, y, color="tab:green", lw=1.5, marker="o" if few else None, ms=3)
            title = f"lr (last {last:.3g})"
        else:
            ax.plot(x[ok], y[ok], color="tab:purple", lw=1.2, marker="o", ms=4 if ok.sum() <= 50 else 2)
            title = f"eval {name} (last {last:.4g}; min {np.nanmin(y):.4g}, max {np.nanmax(y):.4g})"
        ax.set_title(title, fontsize="medium")
        if x_hi > x_lo:
            pad = 0.02 * (x_hi - x_lo)
            ax.set_xlim(x_lo - pad, x_hi + pad)
        ax.set_xlabel("step", fontsize="small")
        ax.tick_params(labelsize="small")
        ax.grid(alpha=0.3)
    return save_figure(fig, out_dir / "curves.png")


def try_plot_training_curves(out_dir: Path) -> Path | None:
    """``plot_training_curves`` that logs a warning instead of raising: a picture must never stop training."""
    try:
        return plot_training_curves(out_dir)
    except Exception as e:  # any plotting failure is only worth a warning
        logger.warning("could not draw training curves in %s: %s: %s", out_dir, type(e).__name__, e)
        return None
