"""YOLO (ultralytics) detection format: ``data.yaml`` (train / val / names) + ``labels/`` beside ``images/``."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from vision.io import list_image_files, write_text_atomic

from .base import (
    DatasetError,
    Loaded,
    Problems,
    Record,
    SplitNotFoundError,
    box_arrays,
    check_box,
    log,
    read_text,
    register_format,
    rel_name,
)
from .common import DetectionSample, norm_sample, save_image

LAYOUT = ("a YOLO data.yaml, or a folder holding one (train/val image folders or .txt lists, labels under "
          ".../labels/... with one 'class cx cy w h' line per box)")


def detect(p: Path) -> bool:
    """A .yaml file, or a folder holding data.yaml."""
    if p.is_file():
        return p.suffix.lower() in (".yaml", ".yml")
    return any((p / n).is_file() for n in ("data.yaml", "data.yml"))


def label_path(image: Path) -> Path:
    """Ultralytics rule: the last ``/images/`` in the path becomes ``/labels/``, the suffix ``.txt``."""
    s = str(image)
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    if sa in s:
        s = sb.join(s.rsplit(sa, 1))
    return Path(s).with_suffix(".txt")


def _names(names: Any, yaml_path: Path) -> list[str]:
    if isinstance(names, list):
        return [str(n) for n in names]
    if isinstance(names, dict):
        try:
            ids = {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError) as e:
            raise DatasetError(f"{yaml_path}: 'names' keys must be class ids ({e})") from e
        return [ids.get(i, str(i)) for i in range(max(ids, default=-1) + 1)]
    raise DatasetError(f"{yaml_path}: 'names' must be a list or a {{id: name}} mapping, got {type(names).__name__}")


def _images(yaml_path: Path, root: Path, entry: Any, split: str) -> list[Path]:
    entries = entry if isinstance(entry, list) else [entry]
    out: list[Path] = []
    for e in entries:
        p = Path(str(e)).expanduser()
        p = p if p.is_absolute() else root / p
        if p.is_dir():
            out.extend(list_image_files(p))
        elif p.is_file() and p.suffix.lower() == ".txt":
            for line in read_text(p, "image list").splitlines():
                line = line.strip()
                if not line:
                    continue
                q = Path(line)
                if not q.is_absolute():
                    q = p.parent / line if line.startswith("./") or (p.parent / line).exists() else root / line
                out.append(q)
        else:
            raise DatasetError(
                f"{yaml_path}: '{split}' entry {str(e)!r} -> {p} is neither an image folder nor a .txt list")
    return out


def _parse_labels(path: Path, width: int, height: int, n_classes: int,
                  problems: Problems) -> tuple[np.ndarray, np.ndarray]:
    """Boxes of one label file. A box outside the image is recorded and its line dropped; any other bad line
    raises (the image is then skipped with --skip-bad: its labels cannot be trusted)."""
    boxes: list[list[float]] = []
    labels: list[int] = []
    try:
        text = read_text(path, "label file", kind="malformed")
    except DatasetError:
        if not path.exists():
            return box_arrays(boxes, labels)  # no label file: an image without objects (ultralytics habit)
        raise
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{lineno}"
        if len(fields) != 5:
            raise DatasetError(f"{where}: expected 5 fields 'class cx cy w h', got {len(fields)}: {line.strip()!r}",
                               kind="malformed")
        try:
            values = [float(v) for v in fields]
        except ValueError:
            raise DatasetError(f"{where}: non-numeric field in {line.strip()!r}", kind="malformed") from None
        cls = values[0]
        if not cls.is_integer():
            raise DatasetError(f"{where}: class id {fields[0]!r} is not an integer", kind="malformed")
        if not 0 <= cls < n_classes:
            raise DatasetError(f"{where}: unknown class id {int(cls)} (data.yaml names {n_classes} classes)",
                               kind="unknown_class")
        cx, cy, w, h = values[1:]
        box = [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
        try:
            boxes.append(check_box(box, width, height, where + f" (normalised cx cy w h {cx:g} {cy:g} {w:g} {h:g})"))
        except DatasetError as e:
            if e.kind != "outside":
                raise
            problems.add(e)  # --skip-bad drops this line only
            continue
        labels.append(int(cls))
    return box_arrays(boxes, labels)


def _warn_shared_labels(files: Sequence[Path], root: Path) -> None:
    """x.jpg and x.png beside each other both take labels/x.txt (as in ultralytics): fine when they are one picture
    saved twice, wrong boxes for one of them otherwise. Not an error; one warning naming them."""
    users: dict[Path, list[Path]] = {}
    for f in files:
        users.setdefault(label_path(f), []).append(f)
    shared = {lab: fs for lab, fs in users.items() if len(fs) > 1}
    if shared:
        lab, fs = next(iter(shared.items()))
        more = f" (and {len(shared) - 1} more label files)" if len(shared) > 1 else ""
        log.warning("%s is the label file of %d images: %s%s; if they are not the same picture, remove or rename "
                    "the others", rel_name(lab, root), len(fs), ", ".join(rel_name(f, root) for f in fs), more)


def read(path: Path, split: str, problems: Problems, images: Any) -> Loaded:
    """Read one split of a data.yaml (or the folder holding it)."""
    yaml_path = path if path.is_file() else next(path / n for n in ("data.yaml", "data.yml") if (path / n).is_file())
    try:
        cfg = yaml.safe_load(read_text(yaml_path, "data.yaml"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise DatasetError(f"{yaml_path}{line}: invalid YAML ({e})") from None
    if not isinstance(cfg, dict):
        raise DatasetError(f"{yaml_path}: expected a mapping with 'train', 'val' and 'names'")
    if "names" not in cfg:
        raise DatasetError(f"{yaml_path}: missing 'names' (the class names)")
    classes = _names(cfg["names"], yaml_path)
    key = split if split in cfg or split != "val" else "valid"
    if cfg.get(key) is None:
        raise SplitNotFoundError(f"{yaml_path}: no '{split}' entry (keys: {', '.join(map(str, cfg))})")
    root = Path(str(cfg.get("path") or ".")).expanduser()
    root = root if root.is_absolute() else (yaml_path.parent / root)
    files = _images(yaml_path, root, cfg[key], split)
    _warn_shared_labels(files, root)
    images.prefetch(files, desc=f"checking {split} images")
    items: list[Record] = []
    for img in files:
        try:
            width, height = images.size(img, str(yaml_path))
            boxes, labels = _parse_labels(label_path(img), width, height, len(classes), problems)
        except DatasetError as e:
            problems.add(e)
            continue
        items.append(Record(img, rel_name(img, root), width, height, boxes, labels))
    return Loaded(classes, items, root)


def write(out_dir: str | Path, split: str, samples: Iterable[DetectionSample], classes: Sequence[str]) -> Path:
    """Write ``out/images/{split}``, ``out/labels/{split}`` (cls cx cy w h, normalised) and ``out/data.yaml``."""
    out = Path(out_dir)
    for sample in samples:
        name, image, boxes, labels = norm_sample(sample)
        save_image(image, out / "images" / split / name)
        w, h = image.width, image.height
        lines = [f"{int(c)} {(b[0] + b[2]) / 2 / w:.6f} {(b[1] + b[3]) / 2 / h:.6f} {(b[2] - b[0]) / w:.6f} "
                 f"{(b[3] - b[1]) / h:.6f}" for b, c in zip(boxes.tolist(), labels.tolist(), strict=True)]
        write_text_atomic(out / "labels" / split / Path(name).with_suffix(".txt"), "".join(ln + "\n" for ln in lines))
    cfg = {"path": ".", "train": "images/train", "val": "images/val", "nc": len(classes),
           "names": [str(c) for c in classes]}
    write_text_atomic(out / "data.yaml", yaml.safe_dump(cfg, sort_keys=False))
    return out


FORMAT = register_format("yolo", "detection", detect=detect, read=read, write=write, layout=LAYOUT, priority=10)
