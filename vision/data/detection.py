"""Object-detection datasets from the folders users already have: COCO, YOLO and Pascal VOC, auto-detected.

Every target uses xyxy boxes in absolute pixels (x2, y2 exclusive, torchvision convention) and 0-based labels.
Annotations are parsed and validated eagerly when the dataset is built; images are decoded lazily.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.parsers import expat

import numpy as np
import torch
import yaml
from PIL import Image
from torch.utils.data import Dataset

__all__ = [
    "DatasetError",
    "DetectionDataset",
    "DetectionSample",
    "build_detection_transforms",
    "detection_collate",
    "load_detection_dataset",
    "write_coco",
    "write_voc",
    "write_yolo",
]

log = logging.getLogger(__name__)

from vision.io import IMAGE_EXTENSIONS, write_bytes_atomic, write_text_atomic  # noqa: E402

BOX_TOLERANCE = 1.0  # pixels a box may stick out of the image before it counts as bad (it is clipped)

# (file_name, image, boxes xyxy float [N, 4] in pixels, labels int [N] 0-based)
DetectionSample = tuple[str, Image.Image, np.ndarray, np.ndarray]

_KIND_WORDS = {
    "missing_image": "missing image",
    "bad_image": "unreadable image",
    "malformed": "malformed annotation",
    "outside": "box outside the image",
    "degenerate": "degenerate box",
    "unknown_class": "unknown class",
}

_LAYOUTS = (
    "expected one of: a COCO annotation .json file, or a folder with annotations/*{split}*.json and images "
    "under images/{split}/, {split}/ or images/; a YOLO data.yaml, or a folder holding one (train/val image "
    "folders, labels under .../labels/...); a Pascal VOC folder with Annotations/, JPEGImages/ and "
    "ImageSets/Main/{split}.txt."
)


class DatasetError(ValueError):
    """Bad dataset input; the message names the file (and line or annotation) and the problem."""

    def __init__(self, message: str, kind: str = "dataset") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class _Item:
    path: Path
    file_name: str
    width: int
    height: int
    boxes: np.ndarray  # float32 [N, 4] xyxy pixels
    labels: np.ndarray  # int64 [N]


@dataclass
class _Loaded:
    classes: list[str]
    items: list[_Item]
    root: Path
    bad: list[str] = field(default_factory=list)
    bad_kinds: Counter[str] = field(default_factory=Counter)


class _Collector:
    """Raises a DatasetError, or with skip_bad records it and lets the caller drop the item."""

    def __init__(self, skip_bad: bool) -> None:
        self.skip_bad = skip_bad
        self.bad: list[str] = []
        self.kinds: Counter[str] = Counter()

    def handle(self, err: DatasetError) -> None:
        if not self.skip_bad or err.kind == "dataset":
            raise err
        self.bad.append(str(err))
        self.kinds[err.kind] += 1
        log.warning("skipping bad item: %s", err)


# --------------------------------------------------------------------------------------------- checks


def _image_size(path: Path, ref: str, verify: bool) -> tuple[int, int]:
    """(width, height) from the image header; with verify also runs PIL's integrity check."""
    if not path.is_file():
        raise DatasetError(f"{path}: image not found (referenced by {ref})", kind="missing_image")
    try:
        with Image.open(path) as im:
            size = im.size
            if verify:
                im.verify()
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise DatasetError(f"{path}: unreadable image ({type(e).__name__}: {e})", kind="bad_image") from e
    return int(size[0]), int(size[1])


def _check_box(box: Sequence[float], width: int, height: int, where: str) -> list[float]:
    """Validate one xyxy pixel box against the image size and clip it; raises DatasetError."""
    x1, y1, x2, y2 = (float(v) for v in box)
    shown = f"[{x1:g}, {y1:g}, {x2:g}, {y2:g}]"
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise DatasetError(f"{where}: box {shown} has non-finite coordinates", kind="malformed")
    if x2 <= x1 or y2 <= y1:
        raise DatasetError(f"{where}: degenerate box {shown} (width or height <= 0)", kind="degenerate")
    tol = BOX_TOLERANCE
    if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
        raise DatasetError(
            f"{where}: box {shown} lies outside the {width}x{height} image (by more than {tol:g} px)",
            kind="outside",
        )
    x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
    y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
    if x2 <= x1 or y2 <= y1:
        raise DatasetError(f"{where}: degenerate box {shown} after clipping to the image", kind="degenerate")
    return [x1, y1, x2, y2]


def _arrays(boxes: list[list[float]], labels: list[int]) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64).reshape(-1)


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------------------------- COCO


def _coco_json_for_split(folder: Path, split: str) -> Path:
    """The annotation file of ``split`` inside ``folder/annotations``."""
    ann_dir = folder / "annotations"
    found = sorted(p for p in ann_dir.glob(f"*{split}*.json") if p.is_file())
    if not found:
        available = ", ".join(p.name for p in sorted(ann_dir.glob("*.json"))) or "none"
        raise DatasetError(
            f"{ann_dir}: no annotation file for split '{split}' (*{split}*.json); found: {available}"
        )
    for preferred in (f"instances_{split}.json", f"{split}.json"):
        if (ann_dir / preferred) in found:
            return ann_dir / preferred
    instances = [p for p in found if p.name.startswith("instances")]
    return (instances or found)[0]


def _coco_image_roots(json_path: Path, split: str, folder: Path | None) -> list[Path]:
    if folder is not None:
        cands = [folder / "images" / split, folder / split, folder / "images", folder]
    else:
        d = json_path.parent
        cands = [
            d,
            d / "images",
            d / "images" / split,
            d.parent / "images" / split,
            d.parent / "images",
            d.parent,
        ]
    return list(dict.fromkeys(cands))


def _load_coco(json_path: Path, split: str, folder: Path | None, col: _Collector, verify: bool) -> _Loaded:
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{json_path}:{e.lineno}: invalid JSON ({e.msg})") from e
    except OSError as e:
        raise DatasetError(f"{json_path}: cannot read ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{json_path}: not a COCO annotation file (needs an 'images' list)")
    try:
        cats = sorted(data.get("categories", []), key=lambda c: int(c["id"]))
        cat_to_label = {int(c["id"]): i for i, c in enumerate(cats)}
        classes = [str(c.get("name", c["id"])) for c in cats]
    except (KeyError, TypeError, ValueError) as e:
        raise DatasetError(f"{json_path}: malformed 'categories' ({e!r})") from e

    roots = _coco_image_roots(json_path, split, folder)
    images: list[tuple[int, dict[str, Any]]] = []
    for k, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            raise DatasetError(f"{json_path}: images[{k}] needs 'id' and 'file_name'")
        images.append((k, img))
    by_image: dict[Any, list[tuple[int, dict[str, Any]]]] = {img["id"]: [] for _, img in images}
    for k, ann in enumerate(data.get("annotations", [])):
        if not isinstance(ann, dict) or ann.get("image_id") not in by_image:
            image_id = ann.get("image_id") if isinstance(ann, dict) else None
            col.handle(
                DatasetError(f"{json_path}: annotation #{k}: unknown image_id {image_id!r}", kind="malformed")
            )
            continue
        by_image[ann["image_id"]].append((k, ann))

    items: list[_Item] = []
    for _, img in images:
        fname = str(img["file_name"])
        try:
            path = next((r / fname for r in roots if (r / fname).is_file()), None)
            if path is None:
                tried = ", ".join(str(r) for r in roots)
                raise DatasetError(
                    f"{json_path}: image '{fname}' (id {img['id']}) not found under any of: {tried}",
                    kind="missing_image",
                )
            width, height = _image_size(path, str(json_path), verify)
            boxes: list[list[float]] = []
            labels: list[int] = []
            for k, ann in by_image[img["id"]]:
                where = f"{json_path}: annotation #{k} (id {ann.get('id')}, image '{fname}')"
                if ann.get("iscrowd", 0):
                    continue  # crowd regions are not instances (torchvision/mmdet skip them for training)
                bbox = ann.get("bbox")
                if (
                    not isinstance(bbox, list)
                    or len(bbox) != 4
                    or not all(isinstance(v, (int, float)) for v in bbox)
                ):
                    raise DatasetError(
                        f"{where}: 'bbox' must be 4 numbers [x, y, w, h], got {bbox!r}", kind="malformed"
                    )
                try:
                    label = cat_to_label[int(ann.get("category_id"))]
                except (KeyError, TypeError, ValueError):
                    raise DatasetError(
                        f"{where}: unknown category_id {ann.get('category_id')!r} (known: {sorted(cat_to_label)})",
                        kind="unknown_class",
                    ) from None
                x, y, w, h = (float(v) for v in bbox)
                boxes.append(_check_box([x, y, x + w, y + h], width, height, where))
                labels.append(label)
        except DatasetError as e:
            col.handle(e)
            continue
        items.append(_Item(path, fname, width, height, *_arrays(boxes, labels)))
    root = folder if folder is not None else json_path.parent
    return _Loaded(classes, items, root)


# ----------------------------------------------------------------------------------------------- YOLO


def _yolo_label_path(image: Path) -> Path:
    """Ultralytics rule: the last ``/images/`` in the path becomes ``/labels/``, the suffix ``.txt``."""
    s = str(image)
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    if sa in s:
        s = sb.join(s.rsplit(sa, 1))
    return Path(s).with_suffix(".txt")


def _yolo_names(names: Any, yaml_path: Path) -> list[str]:
    if isinstance(names, list):
        return [str(n) for n in names]
    if isinstance(names, dict):
        try:
            ids = {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError) as e:
            raise DatasetError(f"{yaml_path}: 'names' keys must be class ids ({e})") from e
        return [ids.get(i, str(i)) for i in range(max(ids, default=-1) + 1)]
    raise DatasetError(
        f"{yaml_path}: 'names' must be a list or a {{id: name}} mapping, got {type(names).__name__}"
    )


def _yolo_images(yaml_path: Path, root: Path, entry: Any, split: str) -> list[Path]:
    entries = entry if isinstance(entry, list) else [entry]
    out: list[Path] = []
    for e in entries:
        p = Path(str(e)).expanduser()
        p = p if p.is_absolute() else root / p
        if p.is_dir():
            out.extend(
                sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
            )
        elif p.is_file() and p.suffix.lower() == ".txt":
            for line in p.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if not line:
                    continue
                q = Path(line)
                if not q.is_absolute():
                    q = (
                        p.parent / line
                        if line.startswith("./") or (p.parent / line).exists()
                        else root / line
                    )
                out.append(q)
        else:
            raise DatasetError(
                f"{yaml_path}: '{split}' entry {str(e)!r} -> {p} is neither an image folder nor a .txt list"
            )
    return out


def _parse_yolo_labels(
    label_path: Path, width: int, height: int, n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    boxes: list[list[float]] = []
    labels: list[int] = []
    if not label_path.is_file():
        return _arrays(boxes, labels)
    try:
        text = label_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{label_path}: cannot read label file ({e})", kind="malformed") from e
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{label_path}:{lineno}"
        if len(fields) != 5:
            raise DatasetError(
                f"{where}: expected 5 fields 'class cx cy w h', got {len(fields)}: {line.strip()!r}",
                kind="malformed",
            )
        try:
            values = [float(v) for v in fields]
        except ValueError:
            raise DatasetError(f"{where}: non-numeric field in {line.strip()!r}", kind="malformed") from None
        cls = values[0]
        if not cls.is_integer():
            raise DatasetError(f"{where}: class id {fields[0]!r} is not an integer", kind="malformed")
        if not 0 <= cls < n_classes:
            raise DatasetError(
                f"{where}: unknown class id {int(cls)} (data.yaml names {n_classes} classes)",
                kind="unknown_class",
            )
        cx, cy, w, h = values[1:]
        box = [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
        boxes.append(_check_box(box, width, height, where))
        labels.append(int(cls))
    return _arrays(boxes, labels)


def _load_yolo(yaml_path: Path, split: str, col: _Collector, verify: bool) -> _Loaded:
    try:
        cfg = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise DatasetError(f"{yaml_path}{line}: invalid YAML ({e})") from e
    if not isinstance(cfg, dict):
        raise DatasetError(f"{yaml_path}: expected a mapping with 'train', 'val' and 'names'")
    if "names" not in cfg:
        raise DatasetError(f"{yaml_path}: missing 'names' (the class names)")
    classes = _yolo_names(cfg["names"], yaml_path)
    key = split if split in cfg or split != "val" else "valid"
    if cfg.get(key) is None:
        raise DatasetError(f"{yaml_path}: no '{split}' entry (keys: {', '.join(map(str, cfg))})")
    root = Path(str(cfg.get("path") or ".")).expanduser()
    root = root if root.is_absolute() else (yaml_path.parent / root)
    items: list[_Item] = []
    for img in _yolo_images(yaml_path, root, cfg[key], split):
        try:
            width, height = _image_size(img, str(yaml_path), verify)
            boxes, labels = _parse_yolo_labels(_yolo_label_path(img), width, height, len(classes))
        except DatasetError as e:
            col.handle(e)
            continue
        items.append(_Item(img, _rel(img, root), width, height, boxes, labels))
    return _Loaded(classes, items, root)


# ------------------------------------------------------------------------------------------------ VOC


@dataclass
class _XNode:
    """A parsed XML element that remembers its line number."""

    tag: str
    line: int
    children: list[_XNode] = field(default_factory=list)
    text: str = ""

    def find(self, tag: str) -> _XNode | None:
        return next((c for c in self.children if c.tag == tag), None)

    def findtext(self, tag: str, default: str | None = None) -> str | None:
        c = self.find(tag)
        return c.text.strip() if c is not None else default


def _parse_xml(path: Path) -> _XNode:
    parser = expat.ParserCreate()
    stack: list[_XNode] = []
    roots: list[_XNode] = []

    def start(tag: str, _attrs: dict[str, str]) -> None:
        node = _XNode(tag, parser.CurrentLineNumber)
        (stack[-1].children if stack else roots).append(node)
        stack.append(node)

    def end(_tag: str) -> None:
        stack.pop()

    def chars(data: str) -> None:
        if stack:
            stack[-1].text += data

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = chars
    try:
        parser.Parse(path.read_bytes(), True)
    except expat.ExpatError as e:
        raise DatasetError(
            f"{path}:{e.lineno}: invalid XML ({expat.ErrorString(e.code)})", kind="malformed"
        ) from e
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e})", kind="malformed") from e
    return roots[0]


def _voc_objects(xml: Path) -> tuple[_XNode | None, list[tuple[str, list[float], int]]]:
    """(root, [(name, [xmin, ymin, xmax, ymax], line)]) of one annotation file; no file -> no objects."""
    if not xml.is_file():
        return None, []
    root = _parse_xml(xml)
    objs: list[tuple[str, list[float], int]] = []
    for obj in (c for c in root.children if c.tag == "object"):
        name = obj.findtext("name")
        bb = obj.find("bndbox")
        if not name or bb is None:
            raise DatasetError(f"{xml}:{obj.line}: <object> needs <name> and <bndbox>", kind="malformed")
        try:
            coords = [float(bb.findtext(k) or "") for k in ("xmin", "ymin", "xmax", "ymax")]
        except ValueError:
            raise DatasetError(
                f"{xml}:{bb.line}: <bndbox> needs numeric xmin, ymin, xmax, ymax", kind="malformed"
            ) from None
        objs.append((name, coords, bb.line))
    return root, objs


def _voc_image(folder: Path, image_id: str, root: _XNode | None) -> Path:
    jpeg = folder / "JPEGImages"
    fname = root.findtext("filename") if root is not None else None
    cands = ([jpeg / fname] if fname else []) + [jpeg / f"{image_id}{ext}" for ext in IMAGE_EXTENSIONS]
    return next((c for c in cands if c.is_file()), cands[0])


def _load_voc(folder: Path, split: str, col: _Collector, verify: bool) -> _Loaded:
    ids_file = folder / "ImageSets" / "Main" / f"{split}.txt"
    if not ids_file.is_file():
        have = ", ".join(p.stem for p in sorted(ids_file.parent.glob("*.txt")) if "_" not in p.stem) or "none"
        raise DatasetError(f"{ids_file}: no image list for split '{split}' (splits found: {have})")
    ids = [ln.split()[0] for ln in ids_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
    explicit = next((folder / n for n in ("labels.txt", "classes.txt") if (folder / n).is_file()), None)

    parsed: list[tuple[str, Path, _XNode | None, list[tuple[str, list[float], int]]]] = []
    for image_id in ids:
        xml = folder / "Annotations" / f"{image_id}.xml"
        try:
            root, objs = _voc_objects(xml)
        except DatasetError as e:
            col.handle(e)
            continue
        parsed.append((image_id, xml, root, objs))
    if explicit is not None:
        classes = [ln.strip() for ln in explicit.read_text(encoding="utf-8").splitlines() if ln.strip()]
    else:
        classes = sorted({name for *_, objs in parsed for name, _, _ in objs})
    index = {c: i for i, c in enumerate(classes)}

    items: list[_Item] = []
    for image_id, xml, root, objs in parsed:
        try:
            path = _voc_image(folder, image_id, root)
            width, height = _image_size(path, str(xml if root is not None else ids_file), verify)
            boxes: list[list[float]] = []
            labels: list[int] = []
            for name, (xmin, ymin, xmax, ymax), line in objs:
                where = f"{xml}:{line} (<bndbox> {xmin:g}, {ymin:g}, {xmax:g}, {ymax:g}, 1-based)"
                if name not in index:
                    raise DatasetError(
                        f"{where}: unknown class '{name}' (not in {explicit})", kind="unknown_class"
                    )
                # VOC pixels are 1-based and inclusive: x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax
                boxes.append(_check_box([xmin - 1, ymin - 1, xmax, ymax], width, height, where))
                labels.append(index[name])
        except DatasetError as e:
            col.handle(e)
            continue
        items.append(_Item(path, _rel(path, folder / "JPEGImages"), width, height, *_arrays(boxes, labels)))
    return _Loaded(classes, items, folder)


# ---------------------------------------------------------------------------------------------- dataset


class DetectionDataset(Dataset):
    """Images with xyxy pixel boxes and 0-based labels, in torchvision detection format."""

    def __init__(
        self,
        loaded: _Loaded,
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

    def __len__(self) -> int:
        return len(self._items)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def annotations(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Ground-truth (boxes xyxy [N, 4], labels [N]) of image ``i`` without decoding it."""
        it = self._items[i]
        return it.boxes.copy(), it.labels.copy()

    def load_image(self, i: int) -> np.ndarray:
        """Decode image ``i`` as an RGB uint8 HWC array; DatasetError naming the file if it cannot."""
        it = self._items[i]
        try:
            with Image.open(it.path) as im:
                arr = np.array(im.convert("RGB"))
        except Exception as e:
            raise DatasetError(
                f"{it.path}: cannot decode image ({type(e).__name__}: {e})", kind="bad_image"
            ) from e
        if arr.shape[:2] != (it.height, it.width):
            raise DatasetError(
                f"{it.path}: decoded size {arr.shape[1]}x{arr.shape[0]} differs from header {it.width}x{it.height}",
                kind="bad_image",
            )
        return arr

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        it = self._items[i]
        image = self.load_image(i)
        boxes, labels = it.boxes, it.labels
        if self.transforms is not None:
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
            kinds = ", ".join(f"{n} {_KIND_WORDS.get(k, k)}" for k, n in sorted(self._bad_kinds.items()))
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
        cats = [{"id": k + 1, "name": name} for k, name in enumerate(self.classes)]
        return {"images": images, "annotations": anns, "categories": cats}

    def __repr__(self) -> str:
        return f"DetectionDataset({self.summary()})"


def load_detection_dataset(
    path: str | os.PathLike[str],
    split: str = "train",
    *,
    transforms: Callable[..., dict[str, Any]] | None = None,
    skip_bad: bool = False,
) -> DetectionDataset:
    """Load a COCO, YOLO or Pascal VOC dataset, detecting the format from ``path``.

    Bad items raise DatasetError, or with ``skip_bad`` are dropped, logged and listed in ``dataset.bad``.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DatasetError(f"{p}: no such file or folder")
    col = _Collector(skip_bad)
    verify = skip_bad
    if p.is_file():
        if p.suffix.lower() == ".json":
            fmt, loaded = "coco", _load_coco(p, split, None, col, verify)
        elif p.suffix.lower() in (".yaml", ".yml"):
            fmt, loaded = "yolo", _load_yolo(p, split, col, verify)
        else:
            raise DatasetError(f"{p}: unknown dataset file type; " + _LAYOUTS.format(split=split))
    else:
        yaml_file = next((p / n for n in ("data.yaml", "data.yml") if (p / n).is_file()), None)
        is_voc = all((p / d).is_dir() for d in ("Annotations", "JPEGImages", "ImageSets/Main"))
        if yaml_file is not None:
            fmt, loaded = "yolo", _load_yolo(yaml_file, split, col, verify)
        elif is_voc:
            fmt, loaded = "voc", _load_voc(p, split, col, verify)
        elif (p / "annotations").is_dir() and any((p / "annotations").glob("*.json")):
            fmt, loaded = "coco", _load_coco(_coco_json_for_split(p, split), split, p, col, verify)
        else:
            raise DatasetError(f"{p}: no detection dataset found; " + _LAYOUTS.format(split=split))
    loaded.bad, loaded.bad_kinds = col.bad, col.kinds
    ds = DetectionDataset(loaded, fmt, split, transforms)
    if col.bad:
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


# ---------------------------------------------------------------------------------------------- writers


def _save_image(image: Image.Image, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else None
    image.convert("RGB").save(
        buf, format=fmt or path.suffix.lstrip(".").upper(), **({"quality": 95} if fmt else {})
    )
    write_bytes_atomic(path, buf.getvalue())


def _norm_sample(sample: DetectionSample) -> tuple[str, Image.Image, np.ndarray, np.ndarray]:
    name, image, boxes, labels = sample
    return (
        name,
        image,
        np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        np.asarray(labels, dtype=np.int64).reshape(-1),
    )


def write_coco(
    out_dir: str | os.PathLike[str], split: str, samples: Iterable[DetectionSample], classes: Sequence[str]
) -> Path:
    """Write ``out/images/{split}/*`` and ``out/annotations/instances_{split}.json``; returns ``out``."""
    out = Path(out_dir)
    images, anns = [], []
    for i, sample in enumerate(samples):
        name, image, boxes, labels = _norm_sample(sample)
        _save_image(image, out / "images" / split / name)
        images.append({"id": i + 1, "file_name": name, "width": image.width, "height": image.height})
        for box, label in zip(boxes.tolist(), labels.tolist(), strict=True):
            w, h = box[2] - box[0], box[3] - box[1]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": int(label) + 1,
                    "bbox": [round(v, 3) for v in (box[0], box[1], w, h)],
                    "area": round(w * h, 3),
                    "iscrowd": 0,
                }
            )
    cats = [{"id": k + 1, "name": str(c), "supercategory": "object"} for k, c in enumerate(classes)]
    data = {"images": images, "annotations": anns, "categories": cats}
    write_text_atomic(out / "annotations" / f"instances_{split}.json", json.dumps(data))
    return out


def write_yolo(
    out_dir: str | os.PathLike[str], split: str, samples: Iterable[DetectionSample], classes: Sequence[str]
) -> Path:
    """Write ``out/images/{split}``, ``out/labels/{split}`` (cls cx cy w h, normalised) and ``out/data.yaml``."""
    out = Path(out_dir)
    for sample in samples:
        name, image, boxes, labels = _norm_sample(sample)
        _save_image(image, out / "images" / split / name)
        w, h = image.width, image.height
        lines = [
            f"{int(c)} {(b[0] + b[2]) / 2 / w:.6f} {(b[1] + b[3]) / 2 / h:.6f} {(b[2] - b[0]) / w:.6f} {(b[3] - b[1]) / h:.6f}"
            for b, c in zip(boxes.tolist(), labels.tolist(), strict=True)
        ]
        write_text_atomic(
            out / "labels" / split / Path(name).with_suffix(".txt"), "".join(ln + "\n" for ln in lines)
        )
    cfg = {
        "path": ".",
        "train": "images/train",
        "val": "images/val",
        "nc": len(classes),
        "names": [str(c) for c in classes],
    }
    write_text_atomic(out / "data.yaml", yaml.safe_dump(cfg, sort_keys=False))
    return out


def write_voc(
    out_dir: str | os.PathLike[str], split: str, samples: Iterable[DetectionSample], classes: Sequence[str]
) -> Path:
    """Write ``out/JPEGImages``, ``out/Annotations`` (1-based pixel boxes), ``out/ImageSets/Main/{split}.txt``, ``out/labels.txt``."""
    from xml.sax.saxutils import escape

    out = Path(out_dir)
    ids: list[str] = []
    for sample in samples:
        name, image, boxes, labels = _norm_sample(sample)
        image_id = Path(name).stem
        ids.append(image_id)
        _save_image(image, out / "JPEGImages" / name)
        objs = []
        for b, c in zip(boxes.tolist(), labels.tolist(), strict=True):
            # inverse of the loader: xmin = x1 + 1, ymin = y1 + 1, xmax = x2, ymax = y2 (integers)
            xmin, ymin = round(b[0]) + 1, round(b[1]) + 1
            xmax, ymax = max(round(b[2]), xmin), max(round(b[3]), ymin)
            objs.append(
                f"  <object>\n    <name>{escape(str(classes[c]))}</name>\n    <pose>Unspecified</pose>\n"
                f"    <truncated>0</truncated>\n    <difficult>0</difficult>\n    <bndbox>\n"
                f"      <xmin>{xmin}</xmin>\n      <ymin>{ymin}</ymin>\n      <xmax>{xmax}</xmax>\n      <ymax>{ymax}</ymax>\n"
                f"    </bndbox>\n  </object>\n"
            )
        xml = (
            f"<annotation>\n  <folder>JPEGImages</folder>\n  <filename>{escape(name)}</filename>\n"
            f"  <size>\n    <width>{image.width}</width>\n    <height>{image.height}</height>\n    <depth>3</depth>\n  </size>\n"
            f"  <segmented>0</segmented>\n{''.join(objs)}</annotation>\n"
        )
        write_text_atomic(out / "Annotations" / f"{image_id}.xml", xml)
    write_text_atomic(out / "ImageSets" / "Main" / f"{split}.txt", "".join(i + "\n" for i in ids))
    write_text_atomic(out / "labels.txt", "".join(f"{c}\n" for c in classes))
    return out
