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


def training_device(device: str | None) -> bool:
    """Apply a ``--device`` choice to an Accelerate training run; returns whether to train on the CPU.

    ``cpu`` -> CPU; ``cuda:N`` -> only GPU N is visible to this process (CUDA_VISIBLE_DEVICES, set before CUDA
    starts); ``cuda`` / ``mps`` / None -> Accelerate's choice. Under a multi-process launch the launcher decides.
    """
    import os

    if device is None:
        return False
    d = device.lower()
    if d == "cpu":
        return True
    if d.startswith("cuda"):
        if not torch.cuda.is_available() and not os.environ.get("CUDA_VISIBLE_DEVICES"):
            raise RuntimeError(f"device '{device}' requested but CUDA is not available on this machine")
        _, _, idx = d.partition(":")
        if idx and int(os.environ.get("WORLD_SIZE", "1") or 1) == 1:
            if torch.cuda.is_initialized():
                raise RuntimeError(f"--device {device}: CUDA is already initialised in this process; set "
                                   f"CUDA_VISIBLE_DEVICES={idx} before starting instead")
            os.environ["CUDA_VISIBLE_DEVICES"] = idx
    return False
