"""COCO detection format: ``annotations/instances_{split}.json`` + ``images/{split}/`` (or a single .json file)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from vision.io import write_text_atomic

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
)
from .common import DetectionSample, norm_sample, save_image

LAYOUT = ("a COCO annotation .json file, or a folder with annotations/*{split}*.json and images under "
          "images/{split}/, {split}/ or images/")


def detect(p: Path) -> bool:
    """A .json file, or a folder with ``annotations/*.json``."""
    if p.is_file():
        return p.suffix.lower() == ".json"
    return (p / "annotations").is_dir() and any((p / "annotations").glob("*.json"))


def json_for_split(folder: Path, split: str) -> Path:
    """The annotation file of ``split`` inside ``folder/annotations``."""
    ann_dir = folder / "annotations"
    found = sorted(p for p in ann_dir.glob(f"*{split}*.json") if p.is_file())
    if not found:
        available = ", ".join(p.name for p in sorted(ann_dir.glob("*.json"))) or "none"
        raise SplitNotFoundError(
            f"{ann_dir}: no annotation file for split '{split}' (*{split}*.json); found: {available}"
        )
    for preferred in (f"instances_{split}.json", f"{split}.json"):
        if (ann_dir / preferred) in found:
            return ann_dir / preferred
    instances = [p for p in found if p.name.startswith("instances")]
    return (instances or found)[0]


def _image_roots(json_path: Path, split: str, folder: Path | None) -> list[Path]:
    if folder is not None:
        cands = [folder / "images" / split, folder / split, folder / "images", folder]
    else:
        d = json_path.parent
        cands = [d, d / "images", d / "images" / split, d.parent / "images" / split, d.parent / "images", d.parent]
    return list(dict.fromkeys(cands))


def _is_id(v: Any) -> bool:
    """COCO ids are integers (other tools write strings or whole floats); lists, dicts, null, booleans are not."""
    if isinstance(v, bool):
        return False
    return isinstance(v, int) or (isinstance(v, float) and v.is_integer()) or (isinstance(v, str) and v != "")


def _as_int(v: Any) -> int | None:
    """A category id as an int (1, 1.0 and "1" are the same id); None if it is not one."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v)
    return None


def read(path: Path, split: str, problems: Problems, images: Any) -> Loaded:
    """Read one split; every bad image, annotation or id is recorded in ``problems``."""
    folder: Path | None = None
    json_path = path
    if path.is_dir():
        folder, json_path = path, json_for_split(path, split)
    try:
        data = json.loads(read_text(json_path, "COCO annotation file"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{json_path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{json_path}: not a COCO annotation file (needs an 'images' list)")
    cats_raw = data.get("categories", [])
    if not isinstance(cats_raw, list):
        raise DatasetError(f"{json_path}: 'categories' must be a list")
    cats: list[dict[str, Any]] = []
    for k, c in enumerate(cats_raw):
        if not isinstance(c, dict) or _as_int(c.get("id")) is None:
            raise DatasetError(f"{json_path}: categories[{k}] needs an integer 'id', got {str(c)[:80]}")
        cats.append(c)
    cats.sort(key=lambda c: _as_int(c["id"]))
    cat_to_label = {_as_int(c["id"]): i for i, c in enumerate(cats)}
    if len(cat_to_label) != len(cats):
        raise DatasetError(f"{json_path}: duplicate category ids in 'categories'")
    classes = [str(c.get("name", c["id"])) for c in cats]

    # images: id and file_name checked, duplicate ids are problems of both images
    imgs: list[dict[str, Any]] = []
    seen: dict[Any, int] = {}
    dup_ids: set[Any] = set()
    for k, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "file_name" not in img or "id" not in img:
            problems.add(DatasetError(f"{json_path}: images[{k}] needs 'id' and 'file_name'", kind="malformed"))
            continue
        if not _is_id(img["id"]):
            problems.add(DatasetError(
                f"{json_path}: images[{k}] ('{img['file_name']}'): id {img['id']!r} must be an integer",
                kind="bad_id"))
            continue
        if img["id"] in seen:
            dup_ids.add(img["id"])
            problems.add(DatasetError(
                f"{json_path}: images[{k}] ('{img['file_name']}'): duplicate image id {img['id']!r} "
                f"(also images[{seen[img['id']]}]); annotations cannot tell them apart", kind="duplicate_id"))
            continue
        seen[img["id"]] = k
        imgs.append(img)
    # one file listed under several ids: its boxes would be split between them and each copy trained with the
    # other copies' objects as background; a problem of every entry (like a duplicate id)
    by_file: dict[str, list[int]] = {}
    for k, img in enumerate(imgs):
        if img["id"] not in dup_ids:
            by_file.setdefault(os.path.normpath(str(img["file_name"])), []).append(k)
    for fname, ks in by_file.items():
        if len(ks) > 1:
            dup_ids.update(imgs[k]["id"] for k in ks)
            problems.add(DatasetError(
                f"{json_path}: image '{fname}' is listed {len(ks)} times (ids "
                f"{', '.join(repr(imgs[k]['id']) for k in ks)}); its boxes would be split between them, each copy "
                "training on the others' objects as background: keep one entry", kind="duplicate_file"))
    imgs = [img for img in imgs if img["id"] not in dup_ids]

    by_image: dict[Any, list[tuple[int, dict[str, Any]]]] = {img["id"]: [] for img in imgs}
    ann_list = data.get("annotations", [])
    if not isinstance(ann_list, list):
        raise DatasetError(f"{json_path}: 'annotations' must be a list")
    for k, ann in enumerate(ann_list):
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if not isinstance(ann, dict) or not _is_id(image_id):
            problems.add(DatasetError(
                f"{json_path}: annotation #{k}: image_id {image_id!r} is not an image id", kind="bad_id"))
            continue
        if image_id in dup_ids:
            continue  # already reported with the duplicate image
        if image_id not in by_image:
            problems.add(DatasetError(
                f"{json_path}: annotation #{k} (id {ann.get('id')}): unknown image_id {image_id!r}",
                kind="unknown_image"))
            continue
        by_image[image_id].append((k, ann))

    roots = _image_roots(json_path, split, folder)
    paths: list[Path | None] = []
    for img in imgs:
        fname = str(img["file_name"])
        paths.append(next((r / fname for r in roots if (r / fname).is_file()), None))
    images.prefetch([p for p in paths if p is not None], desc=f"checking {split} images")

    items: list[Record] = []
    for img, p in zip(imgs, paths, strict=True):
        fname = str(img["file_name"])
        try:
            if p is None:
                tried = ", ".join(str(r) for r in roots)
                raise DatasetError(f"{json_path}: image '{fname}' (id {img['id']}) not found under any of: {tried}",
                                   kind="missing_image")
            width, height = images.size(p, str(json_path))
            boxes: list[list[float]] = []
            labels: list[int] = []
            for k, ann in by_image[img["id"]]:
                where = f"{json_path}: annotation #{k} (id {ann.get('id')}, image '{fname}')"
                if ann.get("iscrowd", 0):
                    continue  # crowd regions are not instances (torchvision/mmdet skip them for training)
                bbox = ann.get("bbox")
                if (not isinstance(bbox, list) or len(bbox) != 4
                        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
                    raise DatasetError(f"{where}: 'bbox' must be 4 numbers [x, y, w, h], got {bbox!r}",
                                       kind="malformed")
                cid = _as_int(ann.get("category_id"))
                if cid not in cat_to_label:
                    raise DatasetError(
                        f"{where}: unknown category_id {ann.get('category_id')!r} (known: {sorted(cat_to_label)})",
                        kind="unknown_class")
                x, y, w, h = (float(v) for v in bbox)
                boxes.append(check_box([x, y, x + w, y + h], width, height, where))
                labels.append(cat_to_label[cid])
        except DatasetError as e:
            problems.add(e)
            continue
        items.append(Record(p, fname, width, height, *box_arrays(boxes, labels)))
    return Loaded(classes, items, folder if folder is not None else json_path.parent)


def write(out_dir: str | Path, split: str, samples: Iterable[DetectionSample], classes: Sequence[str]) -> Path:
    """Write ``out/images/{split}/*`` and ``out/annotations/instances_{split}.json``; returns ``out``."""
    out = Path(out_dir)
    images, anns = [], []
    for i, sample in enumerate(samples):
        name, image, boxes, labels = norm_sample(sample)
        save_image(image, out / "images" / split / name)
        images.append({"id": i + 1, "file_name": name, "width": image.width, "height": image.height})
        for box, label in zip(boxes.tolist(), labels.tolist(), strict=True):
            w, h = box[2] - box[0], box[3] - box[1]
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(label) + 1,
                         "bbox": [round(v, 3) for v in (box[0], box[1], w, h)], "area": round(w * h, 3),
                         "iscrowd": 0})
    write_text_atomic(out / "annotations" / f"instances_{split}.json", json.dumps(coco_dict(images, anns, classes)))
    return out


def coco_dict(images: list[dict], anns: list[dict], classes: Sequence[str]) -> dict[str, Any]:
    """A COCO dict from image and annotation entries; category ids are label + 1."""
    cats = [{"id": k + 1, "name": str(c), "supercategory": "object"} for k, c in enumerate(classes)]
    return {"images": images, "annotations": anns, "categories": cats}


FORMAT = register_format("coco", "detection", detect=detect, read=read, write=write, layout=LAYOUT, priority=30)
