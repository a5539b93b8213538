"""Helpers the detection format writers share."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from vision.io import write_bytes_atomic

# (file_name, image, boxes xyxy float [N, 4] in pixels, labels int [N] 0-based)
DetectionSample = tuple[str, Image.Image, np.ndarray, np.ndarray]


def save_image(image: Image.Image, path: Path) -> None:
    """Save ``image`` (RGB; JPEG quality 95 for .jpg) atomically."""
    buf = io.BytesIO()
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else None
    image.convert("RGB").save(buf, format=fmt or path.suffix.lstrip(".").upper(), **({"quality": 95} if fmt else {}))
    write_bytes_atomic(path, buf.getvalue())


def norm_sample(sample: DetectionSample) -> tuple[str, Image.Image, np.ndarray, np.ndarray]:
    """A sample with boxes as float64 [N, 4] and labels as int64 [N]."""
    name, image, boxes, labels = sample
    return (name, image, np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
            np.asarray(labels, dtype=np.int64).reshape(-1))
