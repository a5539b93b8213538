"""Device selection: cuda > mps > cpu."""

from __future__ import annotations

import torch


def pick_device(prefer: str | None = None) -> torch.device:
    """Return ``prefer`` if given (e.g. "cpu", "cuda:1"), else the best available device."""
    if prefer:
        dev = torch.device(prefer)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device '{prefer}' requested but CUDA is not available on this machine")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def best_mixed_precision(device: torch.device | None = None) -> str:
    """'bf16' where the GPU supports it, 'fp16' on older CUDA GPUs, 'no' on CPU/MPS."""
    device = device or pick_device()
    if device.type != "cuda":
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
