"""Neon (Alemohammad et al. 2025): self-train a generator, then merge its weights in the negative direction.

theta_neon = (1 + w) * theta_base - w * theta_selftrained. Submodules are imported lazily so that the
command line's ``--help`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "neon_merge": "merge",
    "merge_tensor": "merge",
    "CheckpointMismatchError": "merge",
    "merge_checkpoints": "files",
    "MissingComponentError": "files",
    "fid_from_features": "metrics",
    "precision_recall": "metrics",
    "load_feature_extractor": "metrics",
    "self_train": "selftrain",
    "SelfTrainConfig": "selftrain",
    "sample_images": "selftrain",
    "denoising_loss": "selftrain",
    "neon_sweep": "sweep",
    "SweepConfig": "sweep",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'diffusion.neon' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
