"""Training engine: one Accelerate-based loop (AMP, grad accumulation, DDP, exact resume) for every task."""

from .checkpoint import (
    CheckpointCorruptError,
    CheckpointNotFoundError,
    WeightsMismatchError,
    load_model_weights,
    load_training_state,
    resolve_checkpoint,
    save_checkpoint_atomic,
    save_model_weights,
    verify_checkpoint,
)
from .schedule import build_scheduler, lr_multiplier
from .trainer import (
    NonFiniteLossError,
    SeededSampler,
    TrainConfig,
    Trainer,
    TrainingInterrupted,
    default_batch_size,
    param_groups_no_decay,
)

__all__ = [
    "CheckpointCorruptError",
    "CheckpointNotFoundError",
    "NonFiniteLossError",
    "SeededSampler",
    "TrainConfig",
    "Trainer",
    "TrainingInterrupted",
    "WeightsMismatchError",
    "build_scheduler",
    "default_batch_size",
    "load_model_weights",
    "load_training_state",
    "lr_multiplier",
    "param_groups_no_decay",
    "resolve_checkpoint",
    "save_checkpoint_atomic",
    "save_model_weights",
    "verify_checkpoint",
]
