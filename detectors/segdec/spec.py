"""SegDecNet run files: ``segdec.json`` (what rebuilds the network and its input size) and
loading a trained network from a run folder (the final model, ``checkpoints/last``, as the official code)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vision.device import pick_device

from .data import parse_img_size
from .model import SegDecNet

SPEC_FILE = "segdec.json"
DEFAULT_WEIGHTS = "last"  # a segdec run's model is its final checkpoint, as the official code (else best)
SAMPLER_FILE = "sampler.safetensors"

METHODS = ("segdec", "patchcore")  # spec["method"]: the supervised network, or the good-images-only scorer


def build_from_spec(spec: dict[str, Any], pretrained_backbone: bool | str = False) -> torch.nn.Module:
    """The (untrained) model described by a ``segdec.json`` spec: a SegDecNet, or a PatchCore scorer whose memory
    bank has the size recorded in the spec (so its weights file loads)."""
    m = dict(spec["model"])
    method = spec.get("method", "segdec")
    if method == "patchcore":
        from .patchcore import PatchCore

        bank_size = int(m.pop("bank_size", 0))
        pc = PatchCore(**m, pretrained=pretrained_backbone)
        pc.memory_bank = torch.zeros(bank_size, pc.feature_dim)
        return pc
    if method != "segdec":
        raise ValueError(f"unknown method '{method}' in the run's spec (known: {', '.join(METHODS)})")
    return SegDecNet(
        in_channels=int(m.get("in_channels", 1)),
        grad_multiplier=float(m.get("grad_multiplier", 0.0)),
        backbone=m.get("backbone"),
        pretrained=pretrained_backbone,
        width=float(m.get("width", 1.0)),
        stats_head=bool(m.get("stats_head", False)),
    )


def find_weights_file(path: str | Path) -> Path:
    """The weights of a run folder (the final model: checkpoints/last, else best), checkpoint folder or file."""
    from vision.engine.run import run_weights

    return run_weights(path, SPEC_FILE, DEFAULT_WEIGHTS, "SegDecNet")[0]


def load_segdec(
    weights: str | Path,
    device: str | torch.device | None = None,
    *,
    img_size: Any = None,
    channels: int | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A trained SegDecNet (eval mode) and its spec, from a run folder, checkpoint folder or weights file.

    A bare weights file without ``segdec.json`` (e.g. an official ``.pth``) needs ``img_size`` and ``channels``.
    """
    from vision.engine import load_model_weights
    from vision.engine.run import read_spec, run_weights

    wfile, spec_path = run_weights(weights, SPEC_FILE, DEFAULT_WEIGHTS, "SegDecNet")
    if spec_path is not None:
        spec = read_spec(spec_path)
        if img_size is not None:
            spec["img_size"] = list(parse_img_size(img_size))  # type: ignore[arg-type]
    else:
        if img_size is None or channels is None:
            raise FileNotFoundError(
                f"no {SPEC_FILE} next to or above '{wfile}'; pass a run folder made by 'negvision defect train', "
                "or give img_size and channels to use a bare weights file with the paper's network"
            )
        spec = {"model": {"in_channels": channels}, "img_size": list(parse_img_size(img_size)),  # type: ignore[arg-type]
                "channels": channels}
    model = build_from_spec(spec)
    load_model_weights(model, wfile)
    dev = device if isinstance(device, torch.device) else pick_device(device)
    return model.to(dev).eval(), spec
