"""The data-format registry: one module per format (reader, writer and ``detect`` side by side).

Detection: ``coco``, ``yolo``, ``voc``, ``labelme``. Defect layouts (SegDecNet): ``ksdd``, ``ksdd2``, ``dagm``,
``severstal``, ``folder``. ``list_formats("detection")`` lists them in auto-detection order.
"""

from . import coco, dagm, defect_folder, ksdd, ksdd2, labelme, severstal, voc, yolo  # noqa: F401  (detection formats register themselves)  # noqa: F401  (defect layouts)
from .base import (
    BOX_TOLERANCE,
    FORMATS,
    KIND_WORDS,
    DataFormat,
    DatasetError,
    Loaded,
    Problems,
    Record,
    SplitNotFoundError,
    combine_errors,
    detect_format,
    format_names,
    get_format,
    list_formats,
    register_format,
    resolve_format,
)
from .common import DetectionSample

__all__ = [
    "BOX_TOLERANCE",
    "FORMATS",
    "KIND_WORDS",
    "DataFormat",
    "DatasetError",
    "DetectionSample",
    "Loaded",
    "Problems",
    "Record",
    "SplitNotFoundError",
    "combine_errors",
    "detect_format",
    "resolve_format",
    "format_names",
    "get_format",
    "list_formats",
    "register_format",
]
