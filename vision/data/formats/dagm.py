"""DAGM 2007: ``ClassN/{Train,Test}/xxxx.PNG``; defects have ``Label/xxxx_label.PNG``."""

from __future__ import annotations

from pathlib import Path

from .base import DatasetError, Problems, SplitNotFoundError, register_format
from .defect_common import DefectSample, find_mask, images_in, mask_sample

LAYOUT = "DAGM 2007 (ClassN/{Train,Test}/xxxx.PNG + Label/xxxx_label.PNG)"


def detect(root: Path) -> bool:
    """A Train/ folder, or ClassN/Train/ folders."""
    return (root / "Train").is_dir() or any(
        p.is_dir() and p.name.lower().startswith("class") and (p / "Train").is_dir() for p in root.iterdir())


def _dagm_class_dirs(root: Path) -> list[Path]:
    if (root / "Train").is_dir() or (root / "Test").is_dir():
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower().startswith("class"))


def read(root: Path, split: str, problems: Problems | None = None, *, dagm_class: int | None = None, **_: object) -> list[DefectSample]:
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
            raise SplitNotFoundError(f"{c}: no {sub}/ folder (DAGM layout)")
        label_dir = next((p for p in (folder / "Label", folder / "label", folder / "Labels") if p.is_dir()), None)
        for img in images_in(folder):
            mask = find_mask(label_dir, img.stem + "_label") if label_dir is not None else None
            name = f"{c.name}_{img.stem}" if len(classes) > 1 or c is not root else img.stem
            out.append(mask_sample(name, img, mask, str(mask) if mask else ""))
    return out


FORMAT = register_format("dagm", "defect", detect=detect, read=read, layout=LAYOUT, priority=40)
