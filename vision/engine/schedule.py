"""Learning-rate schedules: linear warmup followed by cosine, step (multi-milestone) or constant."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR

SCHEDULERS = ("cosine", "step", "constant")


def lr_multiplier(
    step: int,
    total_steps: int,
    scheduler: str = "cosine",
    *,
    warmup_steps: int = 0,
    warmup_factor: float = 0.001,
    milestones: Sequence[float] = (0.67, 0.89),
    gamma: float = 0.1,
    min_lr_factor: float = 0.0,
) -> float:
    """Factor applied to the base lr at optimizer step ``step`` (0-based: the lr used by that step)."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler '{scheduler}'; choose one of {SCHEDULERS}")
    total_steps = max(int(total_steps), 1)
    warm = 1.0
    if warmup_steps > 0 and step < warmup_steps:
        # mmdet linear warmup: factor goes from warmup_factor (step 0) to 1 (step == warmup_steps)
        warm = warmup_factor + (1.0 - warmup_factor) * step / warmup_steps
    if scheduler == "constant":
        base = 1.0
    elif scheduler == "step":
        # milestones are fractions of the total number of steps, e.g. (8/12, 11/12) for the mmdet 1x schedule
        bounds = [round(m * total_steps) for m in milestones]
        base = gamma ** sum(step >= b for b in bounds)
    else:
        # cosine from 1 at the end of warmup to min_lr_factor at total_steps
        span = max(total_steps - warmup_steps, 1)
        progress = min(max(step - warmup_steps, 0) / span, 1.0)
        base = min_lr_factor + (1.0 - min_lr_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return warm * base


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    scheduler: str = "cosine",
    **kwargs,
) -> LambdaLR:
    """A ``LambdaLR`` following :func:`lr_multiplier`; step it once per optimizer step."""
    lr_multiplier(0, total_steps, scheduler, **kwargs)  # validate the arguments early

    def factor(step: int) -> float:
        return lr_multiplier(step, total_steps, scheduler, **kwargs)

    return LambdaLR(optimizer, factor)
