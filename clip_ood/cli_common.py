"""What the ``negvision ood`` and ``negvision retrieval`` commands share: model option help, the distributed
environment, loading the CLIP encoder with a one-line error. Light to import (no torch / open_clip)."""

from __future__ import annotations

import os
from typing import Any

from vision.cli_common import fail

MODEL_HELP = "open_clip model (ViT-B-16-quickgelu), local-dir:PATH or hf-hub:ORG/REPO."
PRETRAINED_HELP = "open_clip tag (openai), a weights file, or a weights name from weights/manifest.toml."


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the env `accelerate launch` / torchrun set; (0, 1, 0) otherwise."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def load_encoder_or_fail(model: str, pretrained: str | None, device: str | None) -> Any:
    """``clip_ood.encoders.load_encoder``, or exit 1 naming the model; under a multi-process launch without
    ``--device`` each process takes its own GPU (``cuda:LOCAL_RANK``)."""
    from clip_ood.encoders import load_encoder

    _, world, local = dist_env()
    if device is None and world > 1:
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{local}"
    try:
        return load_encoder(model, pretrained=pretrained or None, device=device)
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        fail(f"cannot load model '{model}'" + (f" (pretrained={pretrained})" if pretrained else "") + f": {e}")
