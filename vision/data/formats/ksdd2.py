"""KolektorSDD2: ``{train,test}/ID.png`` + ``ID_GT.png``."""

from __future__ import annotations

from pathlib import Path

from .base import Problems, SplitNotFoundError, register_format
from .defect_common import DefectSample, find_mask, images_in, mask_sample

LAYOUT = "KolektorSDD2 ({train,test}/ID.png + ID_GT.png)"


def detect(root: Path) -> bool:
    """A train/ folder with *_GT.* masks."""
    return (root / "train").is_dir() and any((root / "train").glob("*_GT.*"))


def read(root: Path, split: str, problems: Problems | None = None, **_: object) -> list[DefectSample]:
    """KolektorSDD2: ``{train,test}/ID.png`` + ``ID_GT.png``."""
    folder = root / split
    if not folder.is_dir():
        raise SplitNotFoundError(f"{root}: no '{split}/' folder (KolektorSDD2 layout)")
    out = []
    for img in images_in(folder):
        if img.stem.endswith("_GT"):
            continue
        mask = folder / f"{img.stem}_GT{img.suffix}"
        if not mask.is_file():
            mask = find_mask(folder, img.stem + "_GT") or mask
        out.append(mask_sample(img.stem, img, mask, str(mask)))
    return out


FORMAT = register_format("ksdd2", "defect", detect=detect, read=read, layout=LAYOUT, priority=30)
