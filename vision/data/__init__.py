"""Detection data: COCO / YOLO / VOC / LabelMe loaders (the formats registry), the validation pass, writers,
transforms and the digits sample set."""

from .detection import (
    DETECTION_SPLITS,
    DatasetError,
    DetectionDataset,
    DetectionSample,
    SplitNotFoundError,
    build_detection_transforms,
    detection_collate,
    load_detection_dataset,
    write_coco,
    write_labelme,
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
    "DETECTION_SPLITS",
    "DIGIT_CLASSES",
    "DatasetError",
    "DetectionDataset",
    "DetectionSample",
    "DigitSample",
    "SplitNotFoundError",
    "build_detection_transforms",
    "detection_collate",
    "load_backgrounds",
    "load_detection_dataset",
    "load_mnist_digits",
    "make_digits",
    "render_sample",
    "write_coco",
    "write_labelme",
    "write_voc",
    "write_yolo",
]
