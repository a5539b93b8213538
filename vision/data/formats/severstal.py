"""Severstal steel defects: ``train_images/*.jpg`` + ``train.csv`` with run-length masks."""

from __future__ import annotations

import csv
import zlib
from pathlib import Path

from .base import DatasetError, Problems, register_format
from .defect_common import DefectSample, images_in

LAYOUT = "Severstal (train_images/ + train.csv with RLE)"


def detect(root: Path) -> bool:
    """train.csv beside train_images/."""
    return (root / "train.csv").is_file() and (root / "train_images").is_dir()


def read(root: Path, split: str, problems: Problems | None = None, *, test_every: int = 5, **_: object) -> list[DefectSample]:
    """Severstal: ``train_images/*.jpg`` + ``train.csv`` (``ImageId,ClassId,EncodedPixels`` or the older
    ``ImageId_ClassId,EncodedPixels``); all classes of an image are merged into one mask. The labelled set is
    split deterministically by a hash of the image id: 1 in ``test_every`` goes to test."""
    csv_path, img_dir = root / "train.csv", root / "train_images"
    if not csv_path.is_file() or not img_dir.is_dir():
        raise DatasetError(f"{root}: need train.csv and train_images/ (Severstal layout)", kind="dataset")
    rles: dict[str, list[int]] = {}
    lines: dict[str, str] = {}
    bad_rows: dict[str, DatasetError] = {}
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise DatasetError(f"{csv_path}: empty file", kind="dataset")
    header = [h.strip() for h in rows[0]]
    if header[:3] == ["ImageId", "ClassId", "EncodedPixels"]:
        old = False
    elif header[:2] == ["ImageId_ClassId", "EncodedPixels"]:
        old = True
    else:
        raise DatasetError(
            f"{csv_path}:1: header must be 'ImageId,ClassId,EncodedPixels' (or 'ImageId_ClassId,EncodedPixels'), "
            f"got {rows[0]}",
            kind="dataset",
        )
    for lineno, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        where = f"{csv_path}:{lineno}"
        try:
            if old:
                if len(row) < 2 or "_" not in row[0]:
                    raise DatasetError(f"{where}: expected 'IMAGE_CLASS,RLE', got {row}", kind="malformed")
                image_id, enc = row[0].rsplit("_", 1)[0], row[1]
            else:
                if len(row) < 3:
                    raise DatasetError(f"{where}: expected 3 columns, got {len(row)}", kind="malformed")
                image_id, enc = row[0], row[2]
            enc = enc.strip()
            if not enc:
                continue
            try:
                vals = [int(v) for v in enc.split()]
            except ValueError:
                raise DatasetError(f"{where}: run-length encoding is not a list of integers", kind="malformed") from None
            if len(vals) % 2:
                raise DatasetError(f"{where}: run-length encoding has an odd number of values", kind="malformed")
        except DatasetError as e:
            key = row[0].rsplit("_", 1)[0] if old and row else (row[0] if row else "")
            bad_rows.setdefault(key, e)
            continue
        rles.setdefault(image_id, []).extend(vals)
        lines.setdefault(image_id, where)
    out = []
    for img in images_in(img_dir):
        in_test = zlib.crc32(img.name.encode()) % test_every == 0
        if in_test != (split == "test"):
            continue
        if img.name in bad_rows:
            out.append(DefectSample(img.stem, img, 1, None, rle=None, source=f"!{bad_rows[img.name]}"))
            continue
        rle = rles.get(img.name)
        if rle is None:
            out.append(DefectSample(img.stem, img, 0, None, segmented=True, source=str(csv_path)))
        else:
            out.append(DefectSample(img.stem, img, 1, None, rle=rle, segmented=True, source=lines[img.name]))
    return out


FORMAT = register_format("severstal", "defect", detect=detect, read=read, layout=LAYOUT, priority=10)
