"""The training configuration shared by every task."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .schedule import SCHEDULERS

OPTIMIZERS = ("sgd", "adamw", "adam")


@dataclass
class TrainConfig:
    """Hyper-parameters and bookkeeping options of :class:`Trainer`."""

    out_dir: str
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs if set
    optimizer: str = "sgd"  # "sgd" | "adamw" | "adam"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    scheduler: str = "cosine"  # "cosine" | "step" | "constant"
    warmup_steps: int = 0  # linear warmup from warmup_factor * lr
    warmup_factor: float = 0.001
    milestones: tuple[float, ...] = (0.67, 0.89)  # "step": fractions of total steps
    gamma: float = 0.1
    min_lr_factor: float = 0.0  # "cosine": final lr = min_lr_factor * lr
    grad_accum: int = 1
    clip_grad_norm: float | None = None
    mixed_precision: str = "auto"  # "no" | "fp16" | "bf16" | "auto"
    seed: int = 0
    deterministic: bool = False  # torch.use_deterministic_algorithms (GPU: bit-identical runs, some cost)
    log_every: int = 10  # steps
    checkpoint_every: int = 0  # steps; 0 = only at end of each epoch and at the end
    eval_every: int = 1  # epochs; 0 = never
    eval_at_start: bool = False  # also evaluate the untrained model (step 0): it can be the best checkpoint
    max_bad_steps: int = 5  # consecutive non-finite losses before stopping
    keep_last: int = 2  # checkpoints kept: "last" plus keep_last-1 older ones as checkpoints/step-XXXXXXX
    device: str | None = None  # "cpu", "cuda", "cuda:N", "mps"; None: Accelerate's choice (the launcher's under DDP)
    progress: bool = True
    ddp_find_unused_parameters: bool = False
    ddp_timeout_s: int = 3600  # collectives wait this long (e.g. while the main process evaluates)
    drop_last: bool = False  # for the DataLoader built from a Dataset

    def __post_init__(self) -> None:
        self.milestones = tuple(float(m) for m in self.milestones)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrainConfig.optimizer must be one of {OPTIMIZERS}, got '{self.optimizer}'")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"TrainConfig.scheduler must be one of {SCHEDULERS}, got '{self.scheduler}'")
        if self.mixed_precision not in ("no", "fp16", "bf16", "auto"):
            raise ValueError(
                f"TrainConfig.mixed_precision must be no/fp16/bf16/auto, got '{self.mixed_precision}'"
            )
        if self.grad_accum < 1:
            raise ValueError("TrainConfig.grad_accum must be >= 1")
        if self.max_steps is None and self.epochs < 1:
            raise ValueError("TrainConfig needs epochs >= 1 or max_steps")

    def to_dict(self) -> dict:
        """Plain-JSON dict of the fields."""
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d
