"""Detection data: COCO / YOLO / VOC loaders with auto-detection, writers, transforms and the digits sample set."""

from .detection import (
    DatasetError,
    DetectionDataset,
    DetectionSample,
    build_detection_transforms,
    detection_collate,
    load_detection_dataset,
    write_coco,
    write_voc,
    write_yolo,
)
from .digits import (
    DIGIT_CLASSES,
    DigitSample,
    load_backgrounds,
    load_mnist_digits,
    make_digits,
    render_sample,
)

__all__ = [
    "DIGIT_CLASSES",
    "DatasetError",
    "DetectionDataset",
    "DetectionSample",
    "DigitSample",
    "build_detection_transforms",
    "detection_collate",
    "load_backgrounds",
    "load_detection_dataset",
    "load_mnist_digits",
    "make_digits",
    "render_sample",
    "write_coco",
    "write_voc",
    "write_yolo",
]
