"""SegDecNet: the two-stage surface-defect network trained end-to-end with mixed supervision.

Božič, Tabernik, Skočaj: "End-to-end training of a two-stage neural network for defect detection" (ICPR 2020)
and "Mixed supervision for surface-defect detection" (Computers in Industry 2021).

Names are imported lazily (PEP 562), so ``negvision defect ... --help`` and option errors do not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DATASET_KINDS": "data",
    "DatasetError": "data",
    "DefectDataset": "data",
    "DefectSample": "data",
    "FeatureNorm": "model",
    "FrequencySampler": "sampler",
    "GradientMultiplier": "model",
    "MaskTargets": "data",
    "PRESETS": "config",
    "PatchCoreConfig": "anomaly",
    "SegDecConfig": "config",
    "SegDecNet": "model",
    "detect_layout": "data",
    "dilate_mask": "losses",
    "distance_weights": "losses",
    "downsample_mask": "losses",
    "evaluate_segdec": "evaluate",
    "frequency_sampling_probs": "sampler",
    "gradient_multiply": "model",
    "image_metrics": "metrics",
    "load_defect_dataset": "data",
    "load_segdec": "spec",
    "loss_weights": "losses",
    "parse_img_size": "data",
    "predict_segdec": "predict",
    "rle_decode": "data",
    "segdec_loss": "losses",
    "segmentation_targets": "losses",
    "train_patchcore": "anomaly",
    "train_segdec": "train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
