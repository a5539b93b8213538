"""KolektorSDD: ``kosNN/PartK.jpg`` + ``PartK_label.bmp``; folds of every third ``kos`` folder."""

from __future__ import annotations

from pathlib import Path

from .base import DatasetError, Problems, register_format
from .defect_common import DefectSample, find_mask, images_in, mask_sample

LAYOUT = "KolektorSDD (kosNN/PartK.jpg + PartK_label.bmp)"


def detect(root: Path) -> bool:
    """A folder of kosNN/ folders."""
    return root.is_dir() and any(p.is_dir() and p.name.lower().startswith("kos") for p in root.iterdir())


def read(root: Path, split: str, problems: Problems | None = None, *, fold: int = 0, **_: object) -> list[DefectSample]:
    """KolektorSDD: ``kosNN/PartK.jpg`` + ``PartK_label.bmp``; every 3rd ``kos`` folder (from ``fold``) is test."""
    folders = sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower().startswith("kos"))
    if not folders:
        raise DatasetError(f"{root}: no kosNN/ folders (KolektorSDD layout)", kind="dataset")
    if fold not in (0, 1, 2):
        raise ValueError(f"KolektorSDD fold must be 0, 1 or 2, got {fold}")
    chosen = [f for i, f in enumerate(folders) if (i % 3 == fold) == (split == "test")]
    out = []
    for f in chosen:
        for img in images_in(f):
            if "_label" in img.stem:
                continue
            mask = f / f"{img.stem}_label.bmp"
            if not mask.is_file():
                mask = find_mask(f, img.stem + "_label") or mask
            out.append(mask_sample(f"{f.name}_{img.stem}", img, mask, str(mask)))
    return out


FORMAT = register_format("ksdd", "defect", detect=detect, read=read, layout=LAYOUT, priority=50)
