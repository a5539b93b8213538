"""Training engine: one Accelerate-based loop (AMP, grad accumulation, DDP, exact resume) for every task.

``config`` (TrainConfig), ``sampler`` (seeded order), ``optim``, ``schedule``, ``logs`` (CSV log), ``checkpoint``
(atomic, verified checkpoints), ``run`` (run-folder rules) and ``trainer`` (the loop)."""

from vision.weights_io import CheckpointCorruptError  # what the checkpoint loaders raise

from .checkpoint import (
    CheckpointNotFoundError,
    WeightsMismatchError,
    load_model_weights,
    load_training_state,
    read_weights,
    resolve_checkpoint,
    save_checkpoint_atomic,
    save_model_weights,
    verify_checkpoint,
)
from .config import RunOptions, TrainConfig
from .optim import build_optimizer, param_groups_no_decay
from .sampler import SeededSampler
from .schedule import build_scheduler, lr_multiplier
from .trainer import LossContext, NonFiniteLossError, Trainer, TrainingInterrupted, default_batch_size

__all__ = [
    "CheckpointCorruptError",
    "LossContext",
    "CheckpointNotFoundError",
    "NonFiniteLossError",
    "SeededSampler",
    "RunOptions",
    "TrainConfig",
    "Trainer",
    "TrainingInterrupted",
    "WeightsMismatchError",
    "build_optimizer",
    "build_scheduler",
    "default_batch_size",
    "load_model_weights",
    "load_training_state",
    "read_weights",
    "lr_multiplier",
    "param_groups_no_decay",
    "resolve_checkpoint",
    "save_checkpoint_atomic",
    "save_model_weights",
    "verify_checkpoint",
]
