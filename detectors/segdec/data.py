"""Surface-defect data sets for SegDecNet: KolektorSDD, KolektorSDD2, DAGM 2007, Severstal (RLE) and a generic
folder, auto-detected through the formats registry (``vision.data.formats``: one module per layout). Every
split goes through the same validation pass as detection data (full decode of each image, cached); masks are
checked when the data set is built. Errors name the file, or with ``skip_bad`` the sample is skipped and
counted; images are decoded lazily, in their displayed (EXIF) orientation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from vision.data.defect_split import DATASET_KINDS, check_defect_split, detect_layout, list_samples
from vision.data.formats import DatasetError, SplitNotFoundError
from vision.data.formats.dagm import read as read_dagm
from vision.data.formats.defect_common import DefectSample, read_binary_mask, rle_decode
from vision.data.formats.defect_folder import read as read_folder
from vision.data.formats.ksdd import read as read_ksdd
from vision.data.formats.ksdd2 import read as read_ksdd2
from vision.data.formats.severstal import read as read_severstal
from vision.io import ImageReadError, open_image
from vision.seeding import sample_seed

from .losses import dilate_mask, segmentation_targets

__all__ = [
    "DATASET_KINDS",
    "DatasetError",
    "DefectDataset",
    "DefectSample",
    "MaskTargets",
    "SplitNotFoundError",
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

_GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


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
        self.augment: SurfaceAugment | None = None  # training-time augmentation (set by train_segdec)
        self.augment_seed = 0
        self.epoch = 0

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

    @property
    def num_segmented_defects(self) -> int:
        """Defective images whose pixel mask is used for training."""
        return sum(1 for s in self.samples if s.label == 1 and s.segmented)

    def summary(self) -> str:
        """One line of counts (and the skipped files, if any)."""
        n_pos = sum(self.labels)
        n_seg = self.num_segmented_defects
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
            return np.asarray(open_image(s.image, "L" if self.channels == 1 else "RGB"))
        except ImageReadError as e:
            raise DatasetError(str(e), kind="bad_image") from None

    def _size(self, i: int) -> tuple[int, int]:
        """(width, height) of image ``i`` as displayed."""
        from vision.io import displayed_size, exif_orientation

        with Image.open(self.samples[i].image) as im:
            return displayed_size(*im.size, exif_orientation(im))

    def full_mask(self, i: int) -> np.ndarray | None:
        """Ground-truth defect mask (bool, original resolution, undilated); None if only an image-level label."""
        s = self.samples[i]
        if s.mask is not None:
            return read_binary_mask(s.mask)
        if s.rle is not None:
            w, h = self._size(i)
            return rle_decode(s.rle, h, w, where=s.source)
        if s.label == 0:
            w, h = self._size(i)
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

    def subset(self, indices: Sequence[int], split: str) -> DefectDataset:
        """A dataset of the samples ``indices`` (same size, targets and settings), named ``split``."""
        import copy

        sub = copy.copy(self)
        sub.samples = [self.samples[i] for i in indices]
        sub._cache = {}
        sub.split = split
        sub.bad = []
        return sub

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose augmentation draws ``__getitem__`` makes (called by the training engine)."""
        self.epoch = int(epoch)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self._item(i)
        if self.augment is None:
            return item
        # draws depend on (seed, epoch, index) only: the same under any worker count, and exact on resume
        g = torch.Generator().manual_seed(sample_seed(self.augment_seed, self.epoch, i))
        return self.augment(item, g)

    def _item(self, i: int) -> dict[str, torch.Tensor]:
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


class SurfaceAugment:
    """Augmentation for textures and surfaces, the same geometry for image, target and weight: horizontal and
    vertical flips, 90-degree rotations (180 only for non-square images), brightness and contrast jitter.

    Args:
        flip: random horizontal and vertical flips (each p = 0.5).
        rot90: random multiples of 90 degrees.
        brightness: added offset ~ U[-b, b] (images in [0, 1]).
        contrast: factor ~ U[1 - c, 1 + c] around the image mean.
    """

    def __init__(self, flip: bool = True, rot90: bool = True, brightness: float = 0.1, contrast: float = 0.2) -> None:
        self.flip, self.rot90, self.brightness, self.contrast = flip, rot90, float(brightness), float(contrast)

    def __call__(self, item: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        keys = ("image", "seg_target", "seg_weight")
        out = dict(item)
        t = {k: item[k] for k in keys}
        u = torch.rand(6, generator=generator)  # all draws at once: the same sequence whatever is enabled
        if self.flip:
            for dim, r in ((-1, u[0]), (-2, u[1])):
                if r < 0.5:
                    t = {k: v.flip(dim) for k, v in t.items()}
        if self.rot90:
            square = t["image"].shape[-1] == t["image"].shape[-2] and t["seg_target"].shape[-1] == t["seg_target"].shape[-2]
            k = min(3, int(u[2] * 4)) if square else 2 * int(u[2] < 0.5)
            if k:
                t = {kk: torch.rot90(v, k, dims=(-2, -1)) for kk, v in t.items()}
        img = t["image"]
        if self.contrast > 0:
            c = 1.0 + (u[3] * 2 - 1) * self.contrast
            img = (img - img.mean()) * c + img.mean()
        if self.brightness > 0:
            img = img + (u[4] * 2 - 1) * self.brightness
        t["image"] = img.clamp(0.0, 1.0)
        out.update({k: v.contiguous() for k, v in t.items()})
        return out

    def config(self) -> dict[str, Any]:
        return {"flip": self.flip, "rot90": self.rot90, "brightness": self.brightness, "contrast": self.contrast}


@dataclass(frozen=True)
class MaskTargets:
    """How a split's segmentation targets are made: mask ``dilate`` (pixels), distance-transform ``weighted``
    positive pixels with exponent ``p`` and centre weight ``w_pos``, and ``num_segmented``: keep the masks of only
    that many defective images (chosen with ``seed``; the others become image-level only: weak / mixed supervision;
    None: all)."""

    dilate: int = 1
    weighted: bool = True
    p: float = 1.0
    w_pos: float = 1.0
    num_segmented: int | None = None
    seed: int = 0


def load_defect_dataset(
    root: str | Path,
    split: str = "train",
    kind: str = "auto",
    *,
    img_size: Any = None,
    channels: int | None = None,
    targets: MaskTargets | None = None,
    skip_bad: bool = False,
    dagm_class: int | None = None,
    fold: int = 0,
    verify: bool = True,
    cache: bool = False,
    progress: bool = True,
) -> DefectDataset:
    """Read and check ``split`` of a defect data set (layout auto-detected unless ``kind`` is given).

    ``img_size``: N or WIDTHxHEIGHT (default: the first image's size, rounded down to multiples of 8);
    ``channels``: 1 or 3 (default: from the first image); ``targets``: how the segmentation targets are made
    (:class:`MaskTargets`; default: undilated, weighted, every mask kept). Every image is fully decoded once (``verify``; the result is cached next to the data); bad
    files raise one :class:`DatasetError` listing the first 20 problems, or are skipped with ``skip_bad``.
    A split that does not exist raises :class:`SplitNotFoundError`.
    """
    checked = check_defect_split(root, split, kind, skip_bad=skip_bad, dagm_class=dagm_class, fold=fold,
                                 verify=verify, progress=progress)
    layout, samples = checked.layout, checked.samples
    targets = targets or MaskTargets()
    num_segmented = targets.num_segmented
    first_size = checked.images.size(samples[0].image)
    with Image.open(samples[0].image) as im:
        first_mode = im.mode
    if num_segmented is not None:
        if num_segmented < 0:
            raise ValueError(f"num_segmented must be >= 0, got {num_segmented}")
        seg_pos = [i for i, s in enumerate(samples) if s.label == 1 and s.segmented]
        rng = np.random.default_rng(targets.seed)
        keep = set(rng.permutation(len(seg_pos))[: int(num_segmented)].tolist())
        for j, i in enumerate(seg_pos):
            if j not in keep:
                samples[i] = replace(samples[i], segmented=False)
    size = parse_img_size(img_size)
    if size is None:
        w0, h0 = first_size
        size = (max(8, h0 // 8 * 8), max(8, w0 // 8 * 8))
    if channels is None:
        channels = 1 if first_mode in _GREY_MODES else 3
    return DefectDataset(
        samples,
        size,
        channels,
        dilate=targets.dilate,
        weighted=targets.weighted,
        p=targets.p,
        w_pos=targets.w_pos,
        cache=cache,
        root=root,
        layout=layout,
        split=split,
        bad=checked.bad,
    )


HOLDOUT_SEED = 0x5E6DEC  # the held-out validation images do not change with --seed: runs of any seed compare


def holdout_split(dataset: DefectDataset, share: float) -> tuple[DefectDataset, DefectDataset | None]:
    """(train, validation) from one split: a stratified share of the defective and of the good images held out.

    Each class with at least two images gives ``max(1, round(share * n))`` of them (never all); the choice is fixed
    (not the run's seed). ``share`` 0 -> (dataset, None)."""
    if not 0.0 <= share < 1.0:
        raise ValueError(f"the validation share must be in [0, 1), got {share}")
    if share == 0.0:
        return dataset, None
    rng = np.random.default_rng(HOLDOUT_SEED)
    labels = np.asarray(dataset.labels)
    held: list[int] = []
    for cls in (1, 0):
        idx = np.flatnonzero(labels == cls)
        if len(idx) < 2:
            continue
        k = min(max(1, round(share * len(idx))), len(idx) - 1)
        held += sorted(rng.permutation(idx)[:k].tolist())
    if not held:
        return dataset, None
    keep = sorted(set(range(len(dataset))) - set(held))
    return dataset.subset(keep, dataset.split), dataset.subset(sorted(held), "val")


def validation_record(val_ds: DefectDataset | None, val_data: str | Path | None, val_split: float) -> dict | None:
    """What a run's spec records of its validation images (None without any)."""
    if val_ds is None:
        return None
    return {"images": len(val_ds), "defective": sum(val_ds.labels),
            "source": str(val_data) if val_data is not None else "holdout",
            "share": None if val_data is not None else val_split}


def validation_and_test(
    data: str | Path, layout: str, train_ds: DefectDataset, *, val_data: str | Path | None, val_split: float,
    progress: bool = True, **kwargs: Any,
) -> tuple[DefectDataset, DefectDataset | None, DefectDataset | None]:
    """(train, validation, test) around a loaded training split, at its size and channels: validation is the
    training split of ``val_data``, else a held-out ``val_split`` (:func:`holdout_split`, which also shrinks the
    training set); test is ``data``'s test split (None, with a warning, when it has none; a broken one raises)."""
    size = dict(img_size=train_ds.img_size, channels=train_ds.channels, progress=progress)
    try:
        test_ds: DefectDataset | None = load_defect_dataset(data, "test", layout, **size, **kwargs)
    except SplitNotFoundError as e:
        log.warning("%s; no final evaluation on a test split", e)
        test_ds = None
    if val_data is not None:
        val_ds: DefectDataset | None = load_defect_dataset(val_data, "train", "auto", **size, **kwargs)
        val_ds.split = "val"
    else:
        train_ds, val_ds = holdout_split(train_ds, val_split)
    if val_ds is not None:
        log.info("validation: %d images (%d defective) from %s", len(val_ds), sum(val_ds.labels),
                 f"the training split of {val_data}" if val_data is not None
                 else f"a held-out {val_split:g} of the training images")
    else:
        log.warning("no validation images (--val-split 0, or too few images): the run's model is the last epoch's")
    return train_ds, val_ds, test_ds
