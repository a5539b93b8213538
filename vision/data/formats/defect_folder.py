"""The generic defect folder: ``images/`` + ``masks/`` (same names), optional ``labels.csv``; optional train/ test/."""

from __future__ import annotations

import logging
from pathlib import Path

from .base import DatasetError, Problems, SplitNotFoundError, register_format
from .defect_common import DefectSample, find_mask, images_in, mask_sample, read_labels_csv

log = logging.getLogger("negvision.data")

LAYOUT = ("a generic folder (images/ + masks/ with matching names, optional labels.csv; optionally split into "
          "train/ and test/ sub-folders)")


def detect(root: Path) -> bool:
    """images/ or train/images/."""
    return (root / "images").is_dir() or (root / "train" / "images").is_dir()


def read(root: Path, split: str, problems: Problems | None = None, **_: object) -> list[DefectSample]:
    """Generic: ``images/`` + ``masks/`` (same stem, optionally ``_mask``/``_label``/``_GT``), optional ``labels.csv``
    (``image,label[,segmented]``): a positive without a mask, or with ``segmented=0``, is image-level only.
    An image with neither a mask nor a labels.csv row is defect-free. ``train/`` and ``test/`` sub-folders
    holding this layout are used as splits; without them every split is the whole folder."""
    base = root / split if (root / split / "images").is_dir() else root
    if not (base / "images").is_dir():
        if split == "test" and (root / "train" / "images").is_dir():
            raise SplitNotFoundError(f"{root}: no test/images/ folder (generic layout)")
        raise DatasetError(f"{root}: no images/ folder; expected " + LAYOUT, kind="dataset")
    if base is root and split not in ("", None):
        log.info("%s has no %s/ sub-folder: using the whole folder for split '%s'", root, split, split)
    labels = read_labels_csv(base / "labels.csv", problems if problems is not None else Problems(False)) if (base / "labels.csv").is_file() else {}
    mask_dir = next((p for p in (base / "masks", base / "labels", base / "ground_truth") if p.is_dir()), None)
    out = []
    files = images_in(base / "images")
    by_stem: dict[str, list[Path]] = {}
    for img in files:
        by_stem.setdefault(img.stem, []).append(img)
    shared = [fs for fs in by_stem.values() if len(fs) > 1]
    if shared:  # a.png and a.jpg: one mask / labels.csv row / sample name for both
        more = f" (and {len(shared) - 1} more names)" if len(shared) > 1 else ""
        log.warning("%s share the name '%s' (one mask, one labels.csv row, one output name); if they are not the "
                    "same picture, rename one%s", ", ".join(str(f) for f in shared[0]), shared[0][0].stem, more)
    for img in files:
        mask = find_mask(mask_dir, img.stem) if mask_dir is not None else None
        row = labels.get(img.name) or labels.get(img.stem)
        where = str(base / "labels.csv") if row else (str(mask) if mask else "")
        if mask is not None:
            s = mask_sample(img.stem, img, mask, where)
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


FORMAT = register_format("folder", "defect", detect=detect, read=read, layout=LAYOUT, priority=20)
