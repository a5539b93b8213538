"""Where every random draw of a training run comes from: the run's ``--seed``.

- :func:`seed_everything` seeds Python, NumPy and torch (every device) before the model is built, so the
  initial weights depend on the seed alone; the engine saves and restores these generators in checkpoints.
- :func:`sample_seed` is the seed of one sample's augmentation draws, from ``(seed, epoch, index)`` only: the same
  under any number of DataLoader workers, and replayed exactly when a killed epoch is resumed.
- :func:`seed_albumentations` points an albumentations pipeline (which keeps its own generators, untouched by the
  global seed) at one sample's stream.
- :func:`use_deterministic` turns on PyTorch's deterministic kernels (``--deterministic``; matters on a GPU).
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

CUBLAS_WORKSPACE = ":4096:8"  # what cuBLAS needs for deterministic results (CUDA >= 10.2)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample ``index``'s augmentation draws in ``epoch`` of a run seeded with ``seed`` (< 2**63)."""
    return ((int(seed) * 1_000_003 + int(epoch)) * 10_000_019 + int(index)) % (2**63)


def seed_everything(seed: int) -> None:
    """Seed ``random``, NumPy's legacy global generator and torch (CPU and every CUDA device)."""
    from accelerate.utils import set_seed

    set_seed(int(seed))


def seed_albumentations(transform: Any, seed: int) -> None:
    """Give an albumentations ``Compose`` (and every transform in it) one fresh stream seeded with ``seed``.

    One shared pair of generators, consumed in order, rather than ``Compose.set_random_seed`` (which seeds every
    child transform with the same value, so a flip and a colour jitter would draw the same first number)."""
    set_state = getattr(transform, "set_random_state", None)
    if set_state is None:
        raise TypeError(f"{type(transform).__name__} has no set_random_state: not an albumentations transform")
    set_state(np.random.default_rng(seed), random.Random(seed))


def use_deterministic(enabled: bool = True) -> None:
    """PyTorch's deterministic algorithms (and cuDNN without autotuning) on or off.

    On a GPU this makes two runs with one seed bit-identical at some cost in speed (measured in the README); an
    operation with no deterministic implementation then raises instead of silently differing. cuBLAS also needs
    ``CUBLAS_WORKSPACE_CONFIG`` set before its first call; it is set here unless the environment already sets it.
    On the CPU the kernels used are deterministic already."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(bool(enabled))
    torch.backends.cudnn.deterministic = bool(enabled)
    if enabled:
        torch.backends.cudnn.benchmark = False
