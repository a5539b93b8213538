"""SegDecNet: the two-stage surface-defect network trained end-to-end with mixed supervision.

Božič, Tabernik, Skočaj: "End-to-end training of a two-stage neural network for defect detection" (ICPR 2020)
and "Mixed supervision for surface-defect detection" (Computers in Industry 2021).
"""

from .data import (
    DATASET_KINDS,
    DatasetError,
    DefectDataset,
    DefectSample,
    detect_layout,
    load_defect_dataset,
    parse_img_size,
    rle_decode,
)
from .losses import (
    dilate_mask,
    distance_weights,
    downsample_mask,
    loss_weights,
    segdec_loss,
    segmentation_targets,
)
from .model import FeatureNorm, GradientMultiplier, SegDecNet, gradient_multiply
from .sampler import FrequencySampler, frequency_sampling_probs
from .train import (
    PRESETS,
    evaluate_segdec,
    image_metrics,
    load_segdec,
    predict_segdec,
    train_segdec,
)

__all__ = [
    "DATASET_KINDS",
    "PRESETS",
    "DatasetError",
    "DefectDataset",
    "DefectSample",
    "FeatureNorm",
    "FrequencySampler",
    "GradientMultiplier",
    "SegDecNet",
    "detect_layout",
    "dilate_mask",
    "distance_weights",
    "downsample_mask",
    "evaluate_segdec",
    "frequency_sampling_probs",
    "gradient_multiply",
    "image_metrics",
    "load_defect_dataset",
    "load_segdec",
    "loss_weights",
    "parse_img_size",
    "predict_segdec",
    "rle_decode",
    "segdec_loss",
    "segmentation_targets",
    "train_segdec",
]
