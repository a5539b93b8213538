"""Listing and checking one split of a surface-defect data set (any registered defect layout): the validation
pass shared by ``negvision data check`` and ``defect train|eval``. The torch dataset lives in
``detectors.segdec.data``."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from .formats import DatasetError, Problems, SplitNotFoundError, detect_format, get_format, list_formats
from .formats.defect_common import DefectSample, read_binary_mask, rle_decode
from .validate import ImageChecker

DATASET_KINDS = ("auto", *(f.name for f in list_formats("defect")))
DEFECT_SPLITS = ("train", "test")


def detect_layout(root: str | Path) -> str:
    """Which defect layout (ksdd / ksdd2 / dagm / severstal / folder) the folder ``root`` holds."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data folder '{root}' does not exist", kind="dataset")
    return detect_format(root, "defect").name


def list_samples(
    root: str | Path,
    split: str = "train",
    kind: str = "auto",
    *,
    dagm_class: int | None = None,
    fold: int = 0,
    _bad: Problems | None = None,
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
    samples = get_format(layout).read(root, split, _bad if _bad is not None else Problems(False), dagm_class=dagm_class, fold=fold)
    if not samples:
        raise SplitNotFoundError(f"{root}: no images found for split '{split}' ({layout} layout)")
    return layout, samples


def _check(s: DefectSample, images: ImageChecker) -> DefectSample:
    """Validate one sample (image readable, mask readable/binary/same size); fills in mask-derived labels."""
    if s.source.startswith("!"):
        raise DatasetError(s.source[1:], kind="malformed")
    w, h = images.size(s.image, s.source or None)
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
    return s


@dataclass
class DefectSplit:
    """A checked split: its layout, the good samples, and the skipped problems (with ``skip_bad``)."""

    layout: str
    samples: list[DefectSample]
    bad: list[str]
    images: ImageChecker


def check_defect_split(root: str | Path, split: str = "train", kind: str = "auto", *, skip_bad: bool = False,
                       dagm_class: int | None = None, fold: int = 0, verify: bool = True, progress: bool = True,
                       cache: bool = True) -> DefectSplit:
    """List ``split`` and run the validation pass: every image fully decoded (cached), masks read and compared
    with their image. Problems raise one DatasetError listing the first 20, or with ``skip_bad`` are skipped."""
    bad = Problems(skip_bad)
    layout, raw = list_samples(root, split, kind, dagm_class=dagm_class, fold=fold, _bad=bad)
    images = ImageChecker(root, full_decode=verify, progress=progress, use_cache=cache)
    images.prefetch([s.image for s in raw], desc=f"checking {split} images")
    samples: list[DefectSample] = []
    for s in raw:
        try:
            samples.append(_check(s, images))
        except DatasetError as e:
            bad.add(e)
    bad.raise_if_any(f"split '{split}' of {root}")
    if not samples:
        raise DatasetError(f"{root}: every sample of split '{split}' is bad ({len(bad.items)} skipped)", kind="dataset")
    return DefectSplit(layout, samples, bad.items, images)
