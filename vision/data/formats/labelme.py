"""LabelMe JSON folders: one ``.json`` beside each image (``shapes`` with ``rectangle`` / ``polygon`` / ``circle``).

Splits are ``train/``, ``val/``, ``test/`` sub-folders when present; otherwise the whole folder is the train
split. Rectangles give their box, polygons and circles their bounding box; ``point`` / ``line`` / ``linestrip``
shapes carry no area and are ignored. The class list is ``labels.txt`` / ``classes.txt`` (LabelMe's ``--labels``
file; ``__ignore__`` and ``_background_`` lines are dropped) when present, else the union of the labels of
every split. Coordinates are pixels of the displayed (EXIF-rotated) image, as LabelMe shows it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from vision.io import IMAGE_EXTENSIONS, write_text_atomic

from .base import (
    DatasetError,
    Loaded,
    Problems,
    Record,
    SplitNotFoundError,
    box_arrays,
    check_box,
    read_text,
    register_format,
    rel_name,
)
from .common import DetectionSample, norm_sample, save_image

LAYOUT = "a LabelMe folder (one .json with 'shapes' beside each image; optional train/ val/ test/ sub-folders)"
SPLITS = ("train", "val", "test")
AREA_SHAPES = ("rectangle", "polygon", "circle")
IGNORED_SHAPES = ("point", "line", "linestrip", "points")
_SKIP_LABELS = ("__ignore__", "_background_")


def _is_labelme(f: Path) -> bool:
    try:
        with open(f, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    return b'"shapes"' in head or b'"imagePath"' in head


def _jsons(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.json") if p.is_file() and not p.name.startswith("."))


def _split_dir(root: Path, split: str) -> Path | None:
    if any((root / s).is_dir() for s in SPLITS):
        return root / split if (root / split).is_dir() else None
    return root if split == "train" else None


def detect(p: Path) -> bool:
    """A folder (or its train/ sub-folder) holding LabelMe .json files."""
    if not p.is_dir():
        return False
    base = _split_dir(p, "train") or p
    return any(_is_labelme(f) for f in _jsons(base)[:5])


def _classes(root: Path) -> list[str] | None:
    f = next((root / n for n in ("labels.txt", "classes.txt") if (root / n).is_file()), None)
    if f is None:
        return None
    return [ln.strip() for ln in read_text(f, "class list").splitlines() if ln.strip() and ln.strip() not in _SKIP_LABELS]


def _load_json(f: Path) -> dict[str, Any]:
    try:
        data = json.loads(read_text(f, "LabelMe file", kind="malformed"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{f}:{e.lineno}: invalid JSON ({e.msg})", kind="malformed") from None
    if not isinstance(data, dict) or not isinstance(data.get("shapes"), list):
        raise DatasetError(f"{f}: not a LabelMe file (needs a 'shapes' list)", kind="malformed")
    return data


def _image_for(f: Path, data: dict[str, Any]) -> Path:
    name = data.get("imagePath")
    cands = []
    if isinstance(name, str) and name:
        cands.append(f.parent / name.replace("\\", "/"))
        cands.append(f.parent / Path(name.replace("\\", "/")).name)
    cands += [f.with_suffix(ext) for ext in IMAGE_EXTENSIONS] + [f.with_suffix(ext.upper()) for ext in IMAGE_EXTENSIONS]
    return next((c for c in cands if c.is_file()), cands[0])


def _shape_box(shape: Any, where: str) -> tuple[str, list[float]] | None:
    """(label, xyxy box) of one shape; None for shapes without area."""
    if not isinstance(shape, dict):
        raise DatasetError(f"{where}: a shape must be an object, got {type(shape).__name__}", kind="malformed")
    kind = shape.get("shape_type") or "polygon"  # LabelMe writes polygon when the field is missing
    label = shape.get("label")
    if kind in IGNORED_SHAPES:
        return None
    if kind not in AREA_SHAPES:
        raise DatasetError(f"{where}: unknown shape_type {kind!r} (known: {', '.join(AREA_SHAPES + IGNORED_SHAPES)})",
                           kind="malformed")
    if not isinstance(label, str) or not label.strip():
        raise DatasetError(f"{where}: shape without a 'label'", kind="malformed")
    pts = shape.get("points")
    try:
        xy = [(float(p[0]), float(p[1])) for p in pts]
    except (TypeError, ValueError, IndexError):
        raise DatasetError(f"{where}: 'points' must be a list of [x, y] numbers, got {str(pts)[:60]}",
                           kind="malformed") from None
    need = {"rectangle": 2, "circle": 2, "polygon": 3}[kind]
    if len(xy) < need:
        raise DatasetError(f"{where}: a {kind} needs at least {need} points, got {len(xy)}", kind="malformed")
    if kind == "circle":  # centre and a point on the circle
        (cx, cy), (px, py) = xy[0], xy[1]
        r = math.hypot(px - cx, py - cy)
        return label.strip(), [cx - r, cy - r, cx + r, cy + r]
    xs, ys = [p[0] for p in xy], [p[1] for p in xy]
    return label.strip(), [min(xs), min(ys), max(xs), max(ys)]


def _labels_of(folder: Path) -> set[str]:
    names: set[str] = set()
    for f in _jsons(folder):
        try:
            data = _load_json(f)
        except DatasetError:
            continue
        for s in data["shapes"]:
            if isinstance(s, dict) and isinstance(s.get("label"), str) and \
                    (s.get("shape_type") or "polygon") in AREA_SHAPES:
                names.add(s["label"].strip())
    return names


def read(root: Path, split: str, problems: Problems, images: Any) -> Loaded:
    """Read one split: every .json under the split folder with its image."""
    folder = _split_dir(root, split)
    if folder is None:
        have = [s for s in SPLITS if (root / s).is_dir()] or ["train (the whole folder)"]
        raise SplitNotFoundError(f"{root}: no '{split}' split in this LabelMe folder (splits: {', '.join(have)})")
    classes = _classes(root)
    where_classes = "labels.txt" if classes is not None else "the labels of every split"
    if classes is None:
        names: set[str] = set()
        for s in SPLITS:
            d = _split_dir(root, s)
            if d is not None:
                names |= _labels_of(d)
        classes = sorted(names)
    index = {c: i for i, c in enumerate(classes)}
    parsed: list[tuple[Path, dict[str, Any], Path]] = []
    for f in _jsons(folder):
        try:
            data = _load_json(f)
        except DatasetError as e:
            problems.add(e)
            continue
        parsed.append((f, data, _image_for(f, data)))
    images.prefetch([p for *_, p in parsed if p.is_file()], desc=f"checking {split} images")
    items: list[Record] = []
    for f, data, path in parsed:
        try:
            width, height = images.size(path, str(f))
            boxes: list[list[float]] = []
            labels: list[int] = []
            for k, shape in enumerate(data["shapes"]):
                where = f"{f}: shapes[{k}]"
                got = _shape_box(shape, where)
                if got is None:
                    continue
                label, box = got
                if label not in index:
                    raise DatasetError(f"{where}: unknown class '{label}' (not in {where_classes})",
                                       kind="unknown_class")
                boxes.append(check_box(box, width, height, f"{where} ({shape.get('shape_type') or 'polygon'})"))
                labels.append(index[label])
        except DatasetError as e:
            problems.add(e)
            continue
        items.append(Record(path, rel_name(path, folder), width, height, *box_arrays(boxes, labels)))
    return Loaded(classes, items, root)


def write(out_dir: str | Path, split: str, samples: Iterable[DetectionSample], classes: Sequence[str]) -> Path:
    """Write ``out/{split}/NAME.jpg`` + ``NAME.json`` (rectangles) and ``out/labels.txt``; returns ``out``."""
    out = Path(out_dir)
    for sample in samples:
        name, image, boxes, labels = norm_sample(sample)
        save_image(image, out / split / name)
        shapes = [{"label": str(classes[int(c)]), "points": [[b[0], b[1]], [b[2], b[3]]], "group_id": None,
                   "shape_type": "rectangle", "flags": {}} for b, c in zip(boxes.tolist(), labels.tolist(), strict=True)]
        doc = {"version": "5.4.1", "flags": {}, "shapes": shapes, "imagePath": Path(name).name, "imageData": None,
               "imageHeight": image.height, "imageWidth": image.width}
        write_text_atomic((out / split / name).with_suffix(".json"), json.dumps(doc, indent=2))
    write_text_atomic(out / "labels.txt", "".join(f"{c}\n" for c in classes))
    return out


FORMAT = register_format("labelme", "detection", detect=detect, read=read, write=write, layout=LAYOUT, priority=40)
