"""Object-detection datasets from the folders users already have: COCO, YOLO, Pascal VOC and LabelMe, auto-detected.

The formats live in ``vision.data.formats`` (one module each, registered with the formats registry). Every
target uses xyxy boxes in absolute pixels of the displayed (EXIF-rotated) image (x2, y2 exclusive, torchvision
convention) and 0-based labels. Annotations are parsed and every image fully decoded once when the dataset is
built (the validation pass, cached next to the data); images are decoded again lazily for training.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from vision.io import ImageReadError, open_image
from vision.seeding import sample_seed, seed_albumentations

from .formats import KIND_WORDS, DatasetError, Loaded, Problems, SplitNotFoundError, detect_format, get_format
from .formats.coco import coco_dict
from .formats.coco import write as write_coco
from .formats.common import DetectionSample
from .formats.labelme import write as write_labelme
from .formats.voc import write as write_voc
from .formats.yolo import write as write_yolo
from .validate import ImageChecker

__all__ = [
    "DatasetError",
    "DetectionDataset",
    "DetectionSample",
    "SplitNotFoundError",
    "build_detection_transforms",
    "detection_collate",
    "load_detection_dataset",
    "write_coco",
    "write_labelme",
    "write_voc",
    "write_yolo",
]

log = logging.getLogger(__name__)

DETECTION_SPLITS = ("train", "val", "test")


class DetectionDataset(Dataset):
    """Images with xyxy pixel boxes and 0-based labels, in torchvision detection format."""

    def __init__(
        self,
        loaded: Loaded,
        format: str,
        split: str,
        transforms: Callable[..., dict[str, Any]] | None = None,
    ) -> None:
        self.classes: list[str] = loaded.classes
        self.format = format
        self.split = split
        self.root = loaded.root
        self.transforms = transforms
        self._items = loaded.items
        self.image_paths: list[Path] = [it.path for it in loaded.items]
        self.bad: list[str] = loaded.bad
        self._bad_kinds = loaded.bad_kinds
        self.augment_seed = 0  # the run's seed: augmentation draws depend on (augment_seed, epoch, index) only
        self.epoch = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def bad_kinds(self) -> dict[str, int]:
        """The items ``skip_bad`` dropped, counted by kind (keys of ``KIND_WORDS``: ``degenerate``, ``bad_image`` ...)."""
        return dict(self._bad_kinds)

    def annotations(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Ground-truth (boxes xyxy [N, 4], labels [N]) of image ``i`` without decoding it."""
        it = self._items[i]
        return it.boxes.copy(), it.labels.copy()

    def load_image(self, i: int) -> np.ndarray:
        """Decode image ``i`` (EXIF orientation applied) as an RGB uint8 HWC array; DatasetError naming the file."""
        it = self._items[i]
        try:
            arr = np.array(open_image(it.path, "RGB"))  # displayed orientation: boxes are given in it
        except ImageReadError as e:
            raise DatasetError(str(e), kind="bad_image") from None
        if arr.shape[:2] != (it.height, it.width):
            raise DatasetError(
                f"{it.path}: decoded size {arr.shape[1]}x{arr.shape[0]} differs from header {it.width}x{it.height}",
                kind="bad_image",
            )
        return arr

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose augmentation draws ``__getitem__`` makes (called by the training engine)."""
        self.epoch = int(epoch)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        it = self._items[i]
        image = self.load_image(i)
        boxes, labels = it.boxes, it.labels
        if self.transforms is not None:
            if hasattr(self.transforms, "set_random_state"):  # albumentations keeps its own generators
                # the same draws under any worker count, and replayed exactly when a killed epoch is resumed
                seed_albumentations(self.transforms, sample_seed(self.augment_seed, self.epoch, i))
            out = self.transforms(image=image, bboxes=boxes.copy(), labels=labels.copy())
            image = out["image"]
            boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
            labels = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
        target = {
            "boxes": torch.from_numpy(np.array(boxes, dtype=np.float32)).reshape(-1, 4),
            "labels": torch.from_numpy(np.array(labels, dtype=np.int64)).reshape(-1),
            "image_id": i,
            "orig_size": (it.height, it.width),
            "path": str(it.path),
        }
        return tensor, target

    def summary(self) -> str:
        """One paragraph: format, images, boxes, classes, and the skipped items counted by kind."""
        n_boxes = sum(len(it.labels) for it in self._items)
        empty = sum(1 for it in self._items if len(it.labels) == 0)
        shown = ", ".join(self.classes[:20]) + (", ..." if len(self.classes) > 20 else "")
        text = (
            f"{self.format} dataset {self.root} (split '{self.split}'): {len(self)} images "
            f"({empty} without objects), {n_boxes} boxes, {len(self.classes)} classes [{shown}]"
        )
        if self.bad:
            kinds = ", ".join(f"{n} {KIND_WORDS.get(k, k)}" for k, n in sorted(self._bad_kinds.items()))
            text += f"; skipped {len(self.bad)} bad: {kinds}"
        return text

    def to_coco(self) -> dict[str, Any]:
        """Ground truth as a COCO dict for pycocotools; image ids are dataset indices, category_id = label + 1."""
        images, anns = [], []
        for i, it in enumerate(self._items):
            images.append({"id": i, "width": it.width, "height": it.height, "file_name": it.file_name})
            for box, label in zip(it.boxes.tolist(), it.labels.tolist(), strict=True):
                w, h = box[2] - box[0], box[3] - box[1]
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": i,
                        "category_id": int(label) + 1,
                        "bbox": [box[0], box[1], w, h],
                        "area": w * h,
                        "iscrowd": 0,
                    }
                )
        return coco_dict(images, anns, self.classes)

    def __repr__(self) -> str:
        return f"DetectionDataset({self.summary()})"


def load_detection_dataset(
    path: str | os.PathLike[str],
    split: str = "train",
    *,
    transforms: Callable[..., dict[str, Any]] | None = None,
    skip_bad: bool = False,
    format: str | None = None,
    verify: bool = True,
    progress: bool = True,
    cache: bool = True,
) -> DetectionDataset:
    """Load one split of a COCO, YOLO, Pascal VOC or LabelMe dataset, detecting the format from ``path``.

    Every image is fully decoded once (``verify``; results cached next to the data, keyed by path, size and
    modification time). Bad items raise one DatasetError listing the first 20 problems (``file[:line]: what``),
    or with ``skip_bad`` are dropped, logged and listed in ``dataset.bad``. A split that does not exist raises
    :class:`SplitNotFoundError`.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DatasetError(f"{p}: no such file or folder")
    fmt = get_format(format) if format else detect_format(p, "detection")
    if fmt.task != "detection":
        raise DatasetError(f"{p}: format '{fmt.name}' is a {fmt.task} layout, not a detection format")
    problems = Problems(skip_bad)
    checker = ImageChecker(p if p.is_dir() else p.parent, full_decode=verify, progress=progress, use_cache=cache)
    loaded = fmt.read(p, split, problems, checker)
    checker.save()
    problems.raise_if_any(f"split '{split}' of {p}")
    loaded.bad, loaded.bad_kinds = problems.items, problems.kinds
    ds = DetectionDataset(loaded, fmt.name, split, transforms)
    if problems.items:
        log.warning("%s", ds.summary())
    return ds


def detection_collate(
    batch: Sequence[tuple[torch.Tensor, dict[str, Any]]],
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Keep images and targets as lists (images differ in size), the torchvision detection convention."""
    return [b[0] for b in batch], [b[1] for b in batch]


# ------------------------------------------------------------------------------------------- transforms


def build_detection_transforms(
    train: bool,
    *,
    hflip: float = 0.5,
    scale: tuple[float, float] | None = (0.5, 1.5),
    crop_size: int | None = None,
    color_jitter: float = 0.2,
    min_visibility: float = 0.3,
    img_size: int | None = None,
) -> Any:
    """Albumentations training augmentation for pascal_voc boxes (flip, scale jitter, crop, colour); eval -> None.

    With ``img_size`` (the detector's input size) the image is first resized to that longest side, then scale
    jittered and cropped/padded back to ``img_size`` x ``img_size`` (large-scale jitter); without a crop, scale
    jitter alone would be undone by the detector's own resize.
    """
    if not train:
        return None
    import albumentations as A

    ops: list[Any] = []
    if img_size is not None:
        ops.append(A.LongestMaxSize(max_size=img_size, p=1.0))
        if crop_size is None and scale is not None:
            crop_size = img_size
    if hflip > 0:
        ops.append(A.HorizontalFlip(p=hflip))
    if scale is not None:
        lo, hi = scale
        ops.append(A.RandomScale(scale_limit=(lo - 1.0, hi - 1.0), p=1.0))  # factor = 1 + U(lo - 1, hi - 1)
    if crop_size is not None:
        ops.append(
            A.PadIfNeeded(min_height=crop_size, min_width=crop_size, position="top_left", fill=0, p=1.0)
        )
        ops.append(A.AtLeastOneBBoxRandomCrop(height=crop_size, width=crop_size, p=1.0))
    if color_jitter > 0:
        c = color_jitter
        ops.append(A.ColorJitter(brightness=c, contrast=c, saturation=c, hue=min(c / 4, 0.5), p=0.8))
    bbox_params = A.BboxParams(
        format="pascal_voc",
        label_fields=["labels"],
        min_visibility=min_visibility,
        clip=True,
        filter_invalid_bboxes=True,
    )
    return A.Compose(ops, bbox_params=bbox_params)
