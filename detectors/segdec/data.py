"""Surface-defect data sets for SegDecNet: KolektorSDD, KolektorSDD2, DAGM 2007, Severstal (RLE) and a generic
folder, auto-detected. Annotations and masks are checked when the data set is built (errors name the file,
or with ``skip_bad`` the sample is skipped and counted); images are decoded lazily.
"""

from __future__ import annotations

import csv
import logging
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from vision.data.detection import DatasetError

from .losses import dilate_mask, segmentation_targets

__all__ = [
    "DATASET_KINDS",
    "DatasetError",
    "DefectDataset",
    "DefectSample",
    "detect_layout",
    "list_samples",
    "load_defect_dataset",
    "parse_img_size",
    "read_dagm",
    "read_folder",
    "read_ksdd",
    "read_ksdd2",
    "read_severstal",
    "rle_decode",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
DATASET_KINDS = ("auto", "ksdd", "ksdd2", "dagm", "severstal", "folder")
MASK_SUFFIXES = ("", "_mask", "_label", "_GT")
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")

_LAYOUTS = (
    "expected one of: KolektorSDD (kosNN/PartK.jpg + PartK_label.bmp), KolektorSDD2 ({train,test}/ID.png + "
    "ID_GT.png), DAGM 2007 (ClassN/{Train,Test}/xxxx.PNG + Label/xxxx_label.PNG), Severstal (train_images/ + "
    "train.csv with RLE), or a generic folder (images/ + masks/ with matching names, optional labels.csv; "
    "optionally split into train/ and test/ sub-folders)"
)


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


@dataclass
class _Bad:
    skip_bad: bool
    items: list[str] = field(default_factory=list)
    kinds: Counter = field(default_factory=Counter)

    def handle(self, err: DatasetError) -> None:
        if not self.skip_bad or err.kind == "dataset":
            raise err
        self.items.append(str(err))
        self.kinds[err.kind] += 1
        log.warning("skipping bad sample: %s", err)


# ----------------------------------------------------------------------------------------------- helpers


def parse_img_size(value: Any) -> tuple[int, int] | None:
    """``512`` -> (512, 512); ``"1600x256"`` (WIDTHxHEIGHT) -> (256, 1600) as (H, W); None stays None."""
    if value is None:
        return None
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"img_size must be (H, W), got {value}")
        h, w = int(value[0]), int(value[1])
    else:
        s = str(value).lower().replace(" ", "")
        try:
            if "x" in s:
                ws, hs = s.split("x")
                w, h = int(ws), int(hs)
            else:
                h = w = int(s)
        except ValueError:
            raise ValueError(f"img_size '{value}' is not N or WIDTHxHEIGHT (e.g. 512 or 1600x256)") from None
    if h <= 0 or w <= 0 or h % 8 or w % 8:
        raise ValueError(
            f"img_size {w}x{h} (WxH): width and height must be positive multiples of 8 "
            "(SegDecNet's segmentation map is at 1/8 resolution)"
        )
    return h, w


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _open_image(path: Path, verify: bool) -> tuple[int, int, str]:
    """(width, height, mode) of an image file; DatasetError if it cannot be read."""
    if not path.is_file():
        raise DatasetError(f"{path}: image file does not exist", kind="missing_image")
    try:
        with Image.open(path) as im:
            size, mode = im.size, im.mode
            if verify:
                im.verify()
    except Exception as e:
        raise DatasetError(f"{path}: cannot read image ({type(e).__name__}: {e})", kind="bad_image") from None
    return size[0], size[1], mode


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


def _find_mask(folder: Path, stem: str) -> Path | None:
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


def _parse_flag(value: str, where: str, what: str) -> int:
    v = value.strip().lower()
    if v in _POS_WORDS:
        return 1
    if v in _NEG_WORDS:
        return 0
    raise DatasetError(f"{where}: {what} '{value}' is not 0/1 (or good/defective)", kind="malformed")


def _read_labels_csv(path: Path, bad: _Bad) -> dict[str, tuple[int, bool | None]]:
    """labels.csv: ``image,label[,segmented]`` -> {stem or file name: (label, segmented or None)}."""
    out: dict[str, tuple[int, bool | None]] = {}
    try:
        text = path.read_text(encoding="utf-8-sig")
    except Exception as e:
        raise DatasetError(f"{path}: cannot read ({e})", kind="dataset") from None
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
            label = _parse_flag(row[i_lab], where, "label")
            seg = _parse_flag(row[i_seg], where, "segmented") == 1 if i_seg is not None and row[i_seg].strip() else None
        except DatasetError as e:
            bad.handle(e)
            continue
        name = row[i_img].strip()
        out[name] = (label, seg)
        out.setdefault(Path(name).stem, (label, seg))
    return out


# ----------------------------------------------------------------------------------------------- readers


def _mask_sample(name: str, image: Path, mask: Path | None, source: str = "") -> DefectSample:
    """A sample whose label is decided by its mask (positive iff the mask has a defect pixel)."""
    if mask is None:
        return DefectSample(name, image, 0, None, segmented=True, source=source)
    return DefectSample(name, image, -1, mask, segmented=True, source=source)  # label filled in by _check


def read_ksdd(root: Path, split: str, fold: int = 0) -> list[DefectSample]:
    """KolektorSDD: ``kosNN/PartK.jpg`` + ``PartK_label.bmp``; every 3rd ``kos`` folder (from ``fold``) is test."""
    folders = sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower().startswith("kos"))
    if not folders:
        raise DatasetError(f"{root}: no kosNN/ folders (KolektorSDD layout)", kind="dataset")
    if fold not in (0, 1, 2):
        raise ValueError(f"KolektorSDD fold must be 0, 1 or 2, got {fold}")
    chosen = [f for i, f in enumerate(folders) if (i % 3 == fold) == (split == "test")]
    out = []
    for f in chosen:
        for img in _images_in(f):
            if "_label" in img.stem:
                continue
            mask = f / f"{img.stem}_label.bmp"
            if not mask.is_file():
                mask = _find_mask(f, img.stem + "_label") or mask
            out.append(_mask_sample(f"{f.name}_{img.stem}", img, mask, str(mask)))
    return out


def read_ksdd2(root: Path, split: str) -> list[DefectSample]:
    """KolektorSDD2: ``{train,test}/ID.png`` + ``ID_GT.png``."""
    folder = root / split
    if not folder.is_dir():
        raise DatasetError(f"{root}: no '{split}/' folder (KolektorSDD2 layout)", kind="dataset")
    out = []
    for img in _images_in(folder):
        if img.stem.endswith("_GT"):
            continue
        mask = folder / f"{img.stem}_GT{img.suffix}"
        if not mask.is_file():
            mask = _find_mask(folder, img.stem + "_GT") or mask
        out.append(_mask_sample(img.stem, img, mask, str(mask)))
    return out


def _dagm_class_dirs(root: Path) -> list[Path]:
    if (root / "Train").is_dir() or (root / "Test").is_dir():
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower().startswith("class"))


def read_dagm(root: Path, split: str, dagm_class: int | None = None) -> list[DefectSample]:
    """DAGM 2007: ``ClassN/{Train,Test}/xxxx.PNG``, defects have ``Label/xxxx_label.PNG`` (others are defect-free)."""
    classes = _dagm_class_dirs(root)
    if dagm_class is not None:
        classes = [c for c in classes if c.name.lower() in (f"class{dagm_class}", f"class_{dagm_class}")] or (
            [root] if root.name.lower() == f"class{dagm_class}" else []
        )
        if not classes:
            raise DatasetError(f"{root}: no Class{dagm_class}/ folder (DAGM layout)", kind="dataset")
    sub = "Test" if split == "test" else "Train"
    out = []
    for c in classes:
        folder = next((p for p in (c / sub, c / sub.lower(), c / sub.upper()) if p.is_dir()), None)
        if folder is None:
            raise DatasetError(f"{c}: no {sub}/ folder (DAGM layout)", kind="dataset")
        label_dir = next((p for p in (folder / "Label", folder / "label", folder / "Labels") if p.is_dir()), None)
        for img in _images_in(folder):
            mask = _find_mask(label_dir, img.stem + "_label") if label_dir is not None else None
            name = f"{c.name}_{img.stem}" if len(classes) > 1 or c is not root else img.stem
            out.append(_mask_sample(name, img, mask, str(mask) if mask else ""))
    return out


def read_severstal(root: Path, split: str, test_every: int = 5) -> list[DefectSample]:
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
    for img in _images_in(img_dir):
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


def read_folder(root: Path, split: str, bad: _Bad | None = None) -> list[DefectSample]:
    """Generic: ``images/`` + ``masks/`` (same stem, optionally ``_mask``/``_label``/``_GT``), optional ``labels.csv``
    (``image,label[,segmented]``): a positive without a mask, or with ``segmented=0``, is image-level only.
    An image with neither a mask nor a labels.csv row is defect-free. ``train/`` and ``test/`` sub-folders
    holding this layout are used as splits; without them every split is the whole folder."""
    base = root / split if (root / split / "images").is_dir() else root
    if not (base / "images").is_dir():
        if split == "test" and (root / "train" / "images").is_dir():
            raise DatasetError(f"{root}: no test/images/ folder (generic layout)", kind="dataset")
        raise DatasetError(f"{root}: no images/ folder; {_LAYOUTS}", kind="dataset")
    if base is root and split not in ("", None):
        log.info("%s has no %s/ sub-folder: using the whole folder for split '%s'", root, split, split)
    labels = _read_labels_csv(base / "labels.csv", bad or _Bad(False)) if (base / "labels.csv").is_file() else {}
    mask_dir = next((p for p in (base / "masks", base / "labels", base / "ground_truth") if p.is_dir()), None)
    out = []
    for img in _images_in(base / "images"):
        mask = _find_mask(mask_dir, img.stem) if mask_dir is not None else None
        row = labels.get(img.name) or labels.get(img.stem)
        where = str(base / "labels.csv") if row else (str(mask) if mask else "")
        if mask is not None:
            s = _mask_sample(img.stem, img, mask, where)
            if row is not None:
                s.label = -2 - row[0]  # checked against the mask in _check (-2: says 0, -3: says 1)
                if row[1] is False:
                    s.segmented = False
            out.append(s)
        elif row is not None:
            label, seg = row
            # a defect-free image is fully annotated; a defective one without a mask has an image-level label only
            out.append(DefectSample(img.stem, img, label, None, segmented=label == 0, source=where))
        else:
            out.append(DefectSample(img.stem, img, 0, None, segmented=True, source=""))
    return out


def detect_layout(root: str | Path) -> str:
    """Which of ksdd / ksdd2 / dagm / severstal / folder the folder ``root`` holds."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data folder '{root}' does not exist", kind="dataset")
    if (root / "train.csv").is_file() and (root / "train_images").is_dir():
        return "severstal"
    if (root / "images").is_dir() or (root / "train" / "images").is_dir():
        return "folder"
    if (root / "train").is_dir() and any((root / "train").glob("*_GT.*")):
        return "ksdd2"
    if (root / "Train").is_dir() or any(
        p.is_dir() and p.name.lower().startswith("class") and (p / "Train").is_dir() for p in root.iterdir()
    ):
        return "dagm"
    if any(p.is_dir() and p.name.lower().startswith("kos") for p in root.iterdir()):
        return "ksdd"
    raise DatasetError(f"cannot tell the layout of '{root}': {_LAYOUTS}", kind="dataset")


def list_samples(
    root: str | Path,
    split: str = "train",
    kind: str = "auto",
    *,
    dagm_class: int | None = None,
    fold: int = 0,
    _bad: _Bad | None = None,
) -> tuple[str, list[DefectSample]]:
    """(layout, unchecked samples) of ``split`` ("train" or "test") in ``root``."""
    root = Path(root)
    if kind not in DATASET_KINDS:
        raise ValueError(f"dataset kind must be one of {', '.join(DATASET_KINDS)}, got '{kind}'")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got '{split}'")
    if not root.is_dir():
        raise DatasetError(f"data folder '{root}' does not exist", kind="dataset")
    layout = detect_layout(root) if kind == "auto" else kind
    if layout == "ksdd":
        samples = read_ksdd(root, split, fold)
    elif layout == "ksdd2":
        samples = read_ksdd2(root, split)
    elif layout == "dagm":
        samples = read_dagm(root, split, dagm_class)
    elif layout == "severstal":
        samples = read_severstal(root, split)
    else:
        samples = read_folder(root, split, _bad)
    if not samples:
        raise DatasetError(f"{root}: no images found for split '{split}' ({layout} layout)", kind="dataset")
    return layout, samples


def _check(s: DefectSample, verify: bool) -> tuple[DefectSample, str]:
    """Validate one sample (image readable, mask readable/binary/same size); fills in mask-derived labels."""
    if s.source.startswith("!"):
        raise DatasetError(s.source[1:], kind="malformed")
    w, h, mode = _open_image(s.image, verify)
    if s.mask is not None:
        if not s.mask.is_file():
            raise DatasetError(f"{s.mask}: mask file does not exist (for image {s.image})", kind="missing_mask")
        m = read_binary_mask(s.mask)
        if m.shape != (h, w):
            raise DatasetError(
                f"{s.mask}: mask is {m.shape[1]}x{m.shape[0]} (WxH) but its image {s.image.name} is {w}x{h}",
                kind="mask_size",
            )
        positive = int(m.any())
        if s.label in (-2, -3) and (s.label == -3) != bool(positive):
            said = "defective" if s.label == -3 else "defect-free"
            raise DatasetError(
                f"{s.source}: {s.image.name} is labelled {said} but its mask {s.mask.name} "
                f"{'has' if positive else 'has no'} defect pixels",
                kind="label_conflict",
            )
        s = replace(s, label=positive)
    elif s.rle is not None:
        rle_decode(s.rle, h, w, where=s.source)
    return s, mode


# ----------------------------------------------------------------------------------------------- dataset


class DefectDataset(Dataset):
    """Images resized to ``img_size`` (H, W) in [0, 1] with soft segmentation targets and loss weights at 1/8.

    Items are dicts: ``image`` [C, H, W], ``seg_target`` / ``seg_weight`` [1, H/8, W/8], ``label`` (float 0/1),
    ``segmented`` (bool: the pixel mask is used for training) and ``index``.
    """

    def __init__(
        self,
        samples: Sequence[DefectSample],
        img_size: tuple[int, int],
        channels: int = 1,
        *,
        dilate: int = 1,
        weighted: bool = True,
        p: float = 1.0,
        w_pos: float = 1.0,
        cache: bool = False,
        root: str | Path | None = None,
        layout: str = "folder",
        split: str = "train",
        bad: list[str] | None = None,
    ) -> None:
        size = parse_img_size(img_size)
        assert size is not None
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
        self.samples = list(samples)
        self.img_size = size
        self.channels = channels
        self.dilate = int(dilate)
        self.weighted = bool(weighted)
        self.p = float(p)
        self.w_pos = float(w_pos)
        self.cache = cache
        self._cache: dict[int, dict[str, torch.Tensor]] = {}
        self.root = Path(root) if root is not None else None
        self.layout = layout
        self.split = split
        self.bad = list(bad or [])

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        """Image labels (1 = defective) in index order."""
        return [s.label for s in self.samples]

    @property
    def segmented(self) -> list[bool]:
        """Whether each sample's pixel mask is used for training."""
        return [s.segmented for s in self.samples]

    def summary(self) -> str:
        """One line of counts (and the skipped files, if any)."""
        n_pos = sum(self.labels)
        n_seg = sum(1 for s in self.samples if s.label == 1 and s.segmented)
        line = (
            f"{self.layout} '{self.root}' [{self.split}]: {len(self)} images, {n_pos} defective "
            f"({n_seg} with pixel masks used for training), {len(self) - n_pos} defect-free"
        )
        if self.bad:
            line += f"; skipped {len(self.bad)} bad: " + "; ".join(self.bad[:5]) + (" ..." if len(self.bad) > 5 else "")
        return line

    # ---------------------------------------------------------------- reading
    def read_image(self, i: int) -> np.ndarray:
        """The original image as uint8 [H, W] (grey) or [H, W, 3]."""
        s = self.samples[i]
        try:
            with Image.open(s.image) as im:
                return np.asarray(im.convert("L" if self.channels == 1 else "RGB"))
        except Exception as e:
            raise DatasetError(f"{s.image}: cannot read image ({type(e).__name__}: {e})", kind="bad_image") from None

    def full_mask(self, i: int) -> np.ndarray | None:
        """Ground-truth defect mask (bool, original resolution, undilated); None if only an image-level label."""
        s = self.samples[i]
        if s.mask is not None:
            return read_binary_mask(s.mask)
        if s.rle is not None:
            with Image.open(s.image) as im:
                w, h = im.size
            return rle_decode(s.rle, h, w, where=s.source)
        if s.label == 0:
            with Image.open(s.image) as im:
                w, h = im.size
            return np.zeros((h, w), dtype=bool)
        return None

    def _resize(self, arr: np.ndarray) -> np.ndarray:
        h, w = self.img_size
        if arr.shape[:2] == (h, w):
            return arr.astype(np.float32)
        if arr.ndim == 2:
            return np.array(Image.fromarray(arr.astype(np.float32)).resize((w, h), Image.Resampling.BILINEAR))
        chans = [self._resize(arr[..., c]) for c in range(arr.shape[2])]
        return np.stack(chans, axis=2)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self.cache and i in self._cache:
            return self._cache[i]
        s = self.samples[i]
        img = self._resize(self.read_image(i).astype(np.float32) / 255.0)
        img_t = torch.from_numpy(np.ascontiguousarray(img[None] if img.ndim == 2 else img.transpose(2, 0, 1)))
        h, w = self.img_size
        mask = None
        if s.label == 1 and s.segmented:
            try:
                full = self.full_mask(i)
            except DatasetError:
                raise
            except Exception as e:
                raise DatasetError(f"{s.mask or s.source}: cannot read mask ({e})", kind="bad_mask") from None
            if full is not None:
                m = dilate_mask(full.astype(np.float32), self.dilate)  # official: dilate at full size, then resize
                mask = np.clip(self._resize(m), 0.0, 1.0)
        if mask is None:
            mask = np.zeros((h, w), dtype=np.float32)
        target, weight = segmentation_targets(mask, weighted=self.weighted, p=self.p, w_pos=self.w_pos)
        item = {
            "image": img_t.float().clamp_(0.0, 1.0),
            "seg_target": torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32))[None],
            "seg_weight": torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32))[None],
            "label": torch.tensor(float(s.label)),
            "segmented": torch.tensor(bool(s.segmented and s.label in (0, 1) and (s.label == 0 or mask.any()))),
            "index": torch.tensor(i, dtype=torch.int64),
        }
        if self.cache:
            self._cache[i] = item
        return item


def load_defect_dataset(
    root: str | Path,
    split: str = "train",
    kind: str = "auto",
    *,
    img_size: Any = None,
    channels: int | None = None,
    dilate: int = 1,
    weighted: bool = True,
    p: float = 1.0,
    w_pos: float = 1.0,
    num_segmented: int | None = None,
    seed: int = 0,
    skip_bad: bool = False,
    dagm_class: int | None = None,
    fold: int = 0,
    verify: bool = True,
    cache: bool = False,
) -> DefectDataset:
    """Read and check ``split`` of a defect data set (layout auto-detected unless ``kind`` is given).

    ``img_size``: N or WIDTHxHEIGHT (default: the first image's size, rounded down to multiples of 8);
    ``channels``: 1 or 3 (default: from the first image); ``num_segmented``: keep pixel masks of only that
    many defective training images (seeded choice), the others become image-level only (mixed / weak
    supervision). Bad files raise :class:`DatasetError` naming the file, or are skipped with ``skip_bad``.
    """
    bad = _Bad(skip_bad)
    layout, raw = list_samples(root, split, kind, dagm_class=dagm_class, fold=fold, _bad=bad)
    samples: list[DefectSample] = []
    first_mode: str | None = None
    first_size: tuple[int, int] | None = None
    for s in raw:
        try:
            checked, mode = _check(s, verify)
        except DatasetError as e:
            bad.handle(e)
            continue
        if first_mode is None:
            first_mode = mode
            with Image.open(checked.image) as im:
                first_size = im.size
        samples.append(checked)
    if not samples:
        raise DatasetError(f"{root}: every sample of split '{split}' is bad ({len(bad.items)} skipped)", kind="dataset")
    if num_segmented is not None:
        if num_segmented < 0:
            raise ValueError(f"num_segmented must be >= 0, got {num_segmented}")
        seg_pos = [i for i, s in enumerate(samples) if s.label == 1 and s.segmented]
        rng = np.random.default_rng(seed)
        keep = set(rng.permutation(len(seg_pos))[: int(num_segmented)].tolist())
        for j, i in enumerate(seg_pos):
            if j not in keep:
                samples[i] = replace(samples[i], segmented=False)
    size = parse_img_size(img_size)
    if size is None:
        assert first_size is not None
        w0, h0 = first_size
        size = (max(8, h0 // 8 * 8), max(8, w0 // 8 * 8))
    if channels is None:
        channels = 1 if first_mode in _GREY_MODES else 3
    return DefectDataset(
        samples,
        size,
        channels,
        dilate=dilate,
        weighted=weighted,
        p=p,
        w_pos=w_pos,
        cache=cache,
        root=root,
        layout=layout,
        split=split,
        bad=bad.items,
    )
