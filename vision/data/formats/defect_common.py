"""What the surface-defect layouts share: the sample record, masks (files or run-length), labels.csv."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vision.io import IMAGE_EXTENSIONS

from .base import DatasetError, Problems, read_text

MASK_SUFFIXES = ("", "_mask", "_label", "_GT")


@dataclass
class DefectSample:
    """One image: its label (1 = defective), where its pixel mask comes from, and whether training may use it."""

    name: str
    image: Path
    label: int
    mask: Path | None = None  # mask file (None: no mask file)
    rle: list[int] | None = None  # Severstal: merged run-length pairs (start 1-based, length), column-major
    segmented: bool = True  # False: image-level label only (decision loss only)
    source: str = ""  # where the annotation came from (file and line), for error messages

    @property
    def has_mask(self) -> bool:
        """True when the pixel-level ground truth is known (a mask, RLE, or a defect-free image)."""
        return self.label == 0 or self.mask is not None or self.rle is not None


def images_in(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def read_binary_mask(path: Path) -> np.ndarray:
    """A mask file as a bool array; DatasetError unless its values are 0/255 or 0/1."""
    try:
        with Image.open(path) as im:
            if im.mode == "1":
                arr = np.asarray(im, dtype=np.uint8)
            elif im.mode in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                arr = np.asarray(im)
            else:
                arr = np.asarray(im.convert("RGB")).max(axis=2) if im.mode != "F" else np.asarray(im)
    except Exception as e:
        raise DatasetError(f"{path}: cannot read mask ({type(e).__name__}: {e})", kind="bad_mask") from None
    if arr.ndim != 2:
        raise DatasetError(f"{path}: mask must be a single-channel image, got shape {arr.shape}", kind="bad_mask")
    values = np.unique(arr)
    if not (set(values.tolist()) <= {0, 255} or set(values.tolist()) <= {0, 1}):
        shown = ", ".join(str(v) for v in values[:8].tolist())
        raise DatasetError(
            f"{path}: mask has values other than 0/255 or 0/1 (found {shown}{', ...' if len(values) > 8 else ''}); "
            "save masks as binary PNG/BMP (lossless)",
            kind="bad_mask",
        )
    return arr > 0


def rle_decode(rle: Sequence[int], height: int, width: int, where: str = "RLE") -> np.ndarray:
    """Severstal / Kaggle run-length encoding (1-based start, length pairs, column-major) -> bool [H, W]."""
    vals = [int(v) for v in rle]
    if len(vals) % 2:
        raise DatasetError(f"{where}: run-length encoding has an odd number of values ({len(vals)})", kind="malformed")
    flat = np.zeros(height * width, dtype=bool)
    for start, length in zip(vals[0::2], vals[1::2], strict=True):
        if start < 1 or length < 0 or start - 1 + length > height * width:
            raise DatasetError(
                f"{where}: run ({start}, {length}) lies outside the {width}x{height} image", kind="malformed"
            )
        flat[start - 1 : start - 1 + length] = True
    return flat.reshape((height, width), order="F")


def find_mask(folder: Path, stem: str) -> Path | None:
    if not folder.is_dir():
        return None
    for suffix in MASK_SUFFIXES:
        for ext in IMAGE_EXTENSIONS:
            for e in (ext, ext.upper()):
                cand = folder / f"{stem}{suffix}{e}"
                if cand.is_file():
                    return cand
    return None


_POS_WORDS = {"1", "true", "yes", "defect", "defective", "bad", "ng", "nok", "positive", "pos"}
_NEG_WORDS = {"0", "false", "no", "ok", "good", "normal", "negative", "neg", "defect-free", "clean"}


def parse_flag(value: str, where: str, what: str) -> int:
    v = value.strip().lower()
    if v in _POS_WORDS:
        return 1
    if v in _NEG_WORDS:
        return 0
    raise DatasetError(f"{where}: {what} '{value}' is not 0/1 (or good/defective)", kind="malformed")


def read_labels_csv(path: Path, bad: Problems) -> dict[str, tuple[int, bool | None]]:
    """labels.csv: ``image,label[,segmented]`` -> {stem or file name: (label, segmented or None)}."""
    out: dict[str, tuple[int, bool | None]] = {}
    text = read_text(path, "labels.csv")
    rows = list(csv.reader(text.splitlines()))
    if not rows:
        return out
    header = [h.strip().lower() for h in rows[0]]
    if "image" not in header or "label" not in header:
        raise DatasetError(
            f"{path}:1: header must name the columns 'image' and 'label' (optional 'segmented'), got {rows[0]}",
            kind="dataset",
        )
    i_img, i_lab = header.index("image"), header.index("label")
    i_seg = header.index("segmented") if "segmented" in header else None
    for lineno, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        where = f"{path}:{lineno}"
        try:
            if len(row) < len(header):
                raise DatasetError(f"{where}: expected {len(header)} columns, got {len(row)}", kind="malformed")
            label = parse_flag(row[i_lab], where, "label")
            seg = parse_flag(row[i_seg], where, "segmented") == 1 if i_seg is not None and row[i_seg].strip() else None
        except DatasetError as e:
            bad.add(e)
            continue
        name = row[i_img].strip()
        out[name] = (label, seg)
        out.setdefault(Path(name).stem, (label, seg))
    return out


def mask_sample(name: str, image: Path, mask: Path | None, source: str = "") -> DefectSample:
    """A sample whose label is decided by its mask (positive iff the mask has a defect pixel)."""
    if mask is None:
        return DefectSample(name, image, 0, None, segmented=True, source=source)
    return DefectSample(name, image, -1, mask, segmented=True, source=source)  # label filled in by _check


