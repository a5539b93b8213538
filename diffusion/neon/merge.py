"""Neon weight merge: theta_neon = (1 + w) * theta_base - w * theta_selftrained, on in-memory state dicts.

Alemohammad et al. 2025, "Neon: Negative Extrapolation From Self-Training Improves Image Generation".
The same rule on checkpoints on disk (streamed tensor by tensor) is :func:`diffusion.neon.files.merge_checkpoints`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["CheckpointMismatchError", "check_w", "merge_tensor", "neon_merge"]


class CheckpointMismatchError(ValueError):
    """Base and self-trained checkpoints do not belong to the same architecture."""


def check_w(w: float) -> float:
    """Validate the extrapolation weight w (finite number); a negative w (interpolation) only warns."""
    try:
        w = float(w)
    except (TypeError, ValueError) as e:
        raise ValueError(f"w must be a number, got {w!r}") from e
    if not math.isfinite(w):
        raise ValueError(f"w must be finite, got {w}")
    if w < 0:
        warnings.warn(
            f"w={w} < 0 moves towards the self-trained weights (Neon uses w > 0)", stacklevel=3
        )
    return w


def merge_tensor(key: str, base: Any, selftrained: Any, w: float) -> Any:
    """Merge one entry by the Neon rule; non-float, non-finite or shape-mismatched inputs handled as specified."""
    if not isinstance(base, torch.Tensor) or not isinstance(selftrained, torch.Tensor):
        return base
    if tuple(base.shape) != tuple(selftrained.shape):
        raise CheckpointMismatchError(
            f"shape mismatch for '{key}': base {tuple(base.shape)} vs self-trained {tuple(selftrained.shape)}"
        )
    if not (torch.is_floating_point(base) and torch.is_floating_point(selftrained)):
        return base
    b32 = base.detach().to(torch.float32)
    s32 = selftrained.detach().to(device=b32.device, dtype=torch.float32)
    if not (bool(torch.isfinite(b32).all()) and bool(torch.isfinite(s32).all())):
        return base
    # Neon, eq. (3): theta_neon = (1 + w) * theta_base - w * theta_selftrained  (in float32)
    theta_neon = (1.0 + w) * b32 - w * s32
    return theta_neon.to(base.dtype)


def neon_merge(base: Mapping[str, Any], selftrained: Mapping[str, Any], w: float) -> dict[str, Any]:
    """theta_neon = (1 + w) * base - w * selftrained for floating tensors finite in both; the rest from base.

    Keys missing from ``selftrained`` and non-float entries are copied from ``base``; a shape mismatch raises
    ``ValueError`` naming the key. The result has the keys (and dtypes) of ``base``.

    Args:
        base: theta_base, a state dict ``{name: tensor or any value}``; its keys and dtypes are those of the result.
        selftrained: theta_selftrained, a state dict of the same model (extra keys ignored, missing ones copied).
        w: extrapolation weight, a finite number; w > 0 moves away from the self-trained model, w = 0 gives
            ``base`` back (float64 tensors pass through float32), w < 0 moves towards ``selftrained`` and warns.

    Returns:
        A new dict with the keys of ``base``: merged tensors in ``base``'s dtype (computed in float32), every
        other entry the object of ``base``.
    """
    w = check_w(w)
    out: dict[str, Any] = {}
    for key, b in base.items():
        out[key] = merge_tensor(key, b, selftrained[key], w) if key in selftrained else b
    return out
