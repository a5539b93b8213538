"""The settings shared by every task: :class:`TrainConfig` (how the engine optimises) and :class:`RunOptions`
(where and how a run runs: folder, resume, device, workers, bad files, progress, the replayable config file).

A task's own method settings are one dataclass beside its code (``DetectConfig``, ``SegDecConfig``,
``RetrievalConfig``, ``SelfTrainConfig``); a task's entry point takes ``(data, task_config, train_config,
run_options)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .schedule import SCHEDULERS

OPTIMIZERS = ("sgd", "adamw", "adam")

# The engine's values of the TrainConfig fields a task may default differently (None in a TrainConfig: "the task's
# default"; the Trainer itself falls back to these).
ENGINE_DEFAULTS: dict[str, Any] = {"epochs": 1, "lr": 0.01, "optimizer": "sgd", "momentum": 0.9,
                                   "weight_decay": 1e-4, "scheduler": "cosine", "warmup_steps": 0, "batch_size": 8}


@dataclass
class TrainConfig:
    """Hyper-parameters and bookkeeping options of :class:`Trainer`.

    ``epochs``, ``lr``, ``optimizer``, ``momentum``, ``weight_decay``, ``scheduler``, ``warmup_steps`` and
    ``batch_size`` left None
    take the task's default (a task's entry point fills them with :meth:`resolved`; ``Trainer`` alone: the
    :data:`ENGINE_DEFAULTS`). ``out_dir``, ``device``, ``progress`` and ``keep_last`` are set from the run's
    :class:`RunOptions` by the task entry points; ``Trainer`` users give them here.
    """

    out_dir: str = ""
    epochs: int | None = None
    max_steps: int | None = None  # optimizer steps; overrides epochs if set
    optimizer: str | None = None  # "sgd" | "adamw" | "adam"
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    scheduler: str | None = None  # "cosine" | "step" | "constant"
    warmup_steps: int | None = None  # linear warmup from warmup_factor * lr
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
    batch_size: int | None = None  # samples per step (a task's own loader, or the DataLoader built from a Dataset)
    num_workers: int = 0  # for the DataLoader built from a Dataset

    def __post_init__(self) -> None:
        self.milestones = tuple(float(m) for m in self.milestones)
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrainConfig.optimizer must be one of {OPTIMIZERS}, got '{self.optimizer}'")
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise ValueError(f"TrainConfig.scheduler must be one of {SCHEDULERS}, got '{self.scheduler}'")
        if self.mixed_precision not in ("no", "fp16", "bf16", "auto"):
            raise ValueError(
                f"TrainConfig.mixed_precision must be no/fp16/bf16/auto, got '{self.mixed_precision}'"
            )
        if self.grad_accum < 1:
            raise ValueError("TrainConfig.grad_accum must be >= 1")
        if self.max_steps is None and self.epochs is not None and self.epochs < 1:
            raise ValueError("TrainConfig needs epochs >= 1 or max_steps")

    def is_set(self, name: str) -> bool:
        """Whether a task-defaulted field (:data:`ENGINE_DEFAULTS`) was given (not None)."""
        return getattr(self, name) is not None

    def resolved(self, **defaults: Any) -> TrainConfig:
        """A copy whose unset fields take ``defaults`` (the task's), then the :data:`ENGINE_DEFAULTS`."""
        unknown = set(defaults) - set(ENGINE_DEFAULTS)
        if unknown:
            raise TypeError(f"TrainConfig.resolved: no task default for {sorted(unknown)}")
        fill = {k: (defaults[k] if defaults.get(k) is not None else v)
                for k, v in ENGINE_DEFAULTS.items() if getattr(self, k) is None}
        return dataclasses.replace(self, **fill)

    def to_dict(self) -> dict:
        """Plain-JSON dict of the fields."""
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d


@dataclass
class RunOptions:
    """Where and how a training run runs, not what it learns: the options every ``train`` command shares.

    Attributes:
        out: the run folder (the run-folder rule of :func:`vision.engine.run.prepare_run_dir`: a used folder
            becomes ``out2``, ``out3``... unless ``resume`` or ``exist_ok``).
        resume: True (the folder's newest checkpoint) or a checkpoint folder.
        exist_ok: reuse a used ``out``, clearing its earlier logs.
        keep_last: checkpoints kept ("last" plus keep_last-1 older ones).
        device: "cpu", "cuda", "cuda:N", "mps"; None: the best available (the launcher's under DDP).
        workers: DataLoader worker processes.
        skip_bad: leave unreadable / invalid items out (listed in ``skipped.txt``) instead of stopping.
        progress: progress bars.
        config: the command's options, written to the run's ``config.yaml`` (``--config`` replays the run); None:
            no config file.
    """

    out: str | Path = "runs/train"
    resume: bool | str = False
    exist_ok: bool = False
    keep_last: int = 2
    device: str | None = None
    workers: int = 0
    skip_bad: bool = False
    progress: bool = True
    config: dict[str, Any] | None = None

    def train_fields(self, out_dir: str | Path) -> dict[str, Any]:
        """The :class:`TrainConfig` fields these options set (for ``dataclasses.replace``)."""
        return {"out_dir": str(out_dir), "device": self.device, "progress": self.progress,
                "keep_last": self.keep_last, "num_workers": self.workers}

    def to_dict(self) -> dict:
        """Plain-JSON dict of the fields (``out`` as a string, without ``config``)."""
        d = dataclasses.asdict(self)
        d.pop("config")
        d["out"] = str(self.out)
        return d
