"""Pascal VOC detection format: ``Annotations/*.xml``, ``JPEGImages/``, ``ImageSets/Main/{split}.txt``.

Boxes are 1-based inclusive pixels (x1 = xmin - 1, x2 = xmax). The class list is ``labels.txt`` /
``classes.txt`` when present, else the union of the object names over every split, so a split that lacks a
class still gets the same class list.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.parsers import expat

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

LAYOUT = "a Pascal VOC folder with Annotations/, JPEGImages/ and ImageSets/Main/{split}.txt"


def detect(p: Path) -> bool:
    """A folder with Annotations/, JPEGImages/ and ImageSets/Main/."""
    return p.is_dir() and all((p / d).is_dir() for d in ("Annotations", "JPEGImages", "ImageSets/Main"))


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


def _split_ids(folder: Path, split: str) -> list[str]:
    ids_file = folder / "ImageSets" / "Main" / f"{split}.txt"
    if not ids_file.is_file():
        raise SplitNotFoundError(f"{ids_file}: no image list for split '{split}' (splits found: "
                                 f"{', '.join(splits(folder)) or 'none'})")
    return [ln.split()[0] for ln in read_text(ids_file, "image list").splitlines() if ln.strip()]


def splits(folder: Path) -> list[str]:
    """Split names of a VOC folder (ImageSets/Main/NAME.txt without the per-class NAME_CLASS.txt lists)."""
    return [p.stem for p in sorted((folder / "ImageSets" / "Main").glob("*.txt")) if "_" not in p.stem]


def _classes(folder: Path) -> tuple[list[str] | None, Path | None]:
    explicit = next((folder / n for n in ("labels.txt", "classes.txt") if (folder / n).is_file()), None)
    if explicit is None:
        return None, None
    return [ln.strip() for ln in read_text(explicit, "class list").splitlines() if ln.strip()], explicit


def _union_of_names(folder: Path) -> list[str]:
    """Object names over every split (unreadable files are reported by the split that lists them)."""
    names: set[str] = set()
    for s in splits(folder):
        try:
            ids = _split_ids(folder, s)
        except DatasetError:
            continue
        for image_id in ids:
            try:
                _, objs = _voc_objects(folder / "Annotations" / f"{image_id}.xml")
            except DatasetError:
                continue
            names.update(name for name, _, _ in objs)
    return sorted(names)


def read(folder: Path, split: str, problems: Problems, images: Any) -> Loaded:
    """Read one split; ids whose XML or image is missing, malformed XML and bad boxes go to ``problems``."""
    ids = _split_ids(folder, split)
    classes, explicit = _classes(folder)
    parsed: list[tuple[str, Path, _XNode, list[tuple[str, list[float], int]]]] = []
    seen: set[str] = set()
    for image_id in ids:
        if image_id in seen:
            continue  # listed twice: once is enough
        seen.add(image_id)
        xml = folder / "Annotations" / f"{image_id}.xml"
        try:
            if not xml.is_file():
                raise DatasetError(f"{xml}: annotation file not found (id '{image_id}' is listed in "
                                   f"ImageSets/Main/{split}.txt)", kind="missing_annotation")
            root, objs = _voc_objects(xml)
        except DatasetError as e:
            problems.add(e)
            continue
        parsed.append((image_id, xml, root, objs))
    if classes is None:
        classes = _union_of_names(folder)
    index = {c: i for i, c in enumerate(classes)}
    where_classes = str(explicit) if explicit is not None else "the object names of every split"
    paths = [_voc_image(folder, image_id, root) for image_id, _, root, _ in parsed]
    images.prefetch([p for p in paths if p.is_file()], desc=f"checking {split} images")

    items: list[Record] = []
    for (_id, xml, _root, objs), path in zip(parsed, paths, strict=True):
        try:
            width, height = images.size(path, str(xml))
            boxes: list[list[float]] = []
            labels: list[int] = []
            for name, (xmin, ymin, xmax, ymax), line in objs:
                where = f"{xml}:{line} (<bndbox> {xmin:g}, {ymin:g}, {xmax:g}, {ymax:g}, 1-based)"
                if name not in index:
                    raise DatasetError(f"{where}: unknown class '{name}' (not in {where_classes})",
                                       kind="unknown_class")
                # VOC pixels are 1-based and inclusive: x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax
                boxes.append(check_box([xmin - 1, ymin - 1, xmax, ymax], width, height, where))
                labels.append(index[name])
        except DatasetError as e:
            problems.add(e)
            continue
        items.append(Record(path, rel_name(path, folder / "JPEGImages"), width, height, *box_arrays(boxes, labels)))
    return Loaded(classes, items, folder)


def write(
    out_dir: str | Path, split: str, samples: Iterable[DetectionSample], classes: Sequence[str]
) -> Path:
    """Write ``out/JPEGImages``, ``out/Annotations`` (1-based pixel boxes), ``out/ImageSets/Main/{split}.txt``, ``out/labels.txt``."""
    from xml.sax.saxutils import escape

    out = Path(out_dir)
    ids: list[str] = []
    for sample in samples:
        name, image, boxes, labels = norm_sample(sample)
        image_id = Path(name).stem
        ids.append(image_id)
        save_image(image, out / "JPEGImages" / name)
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


FORMAT = register_format("voc", "detection", detect=detect, read=read, write=write, layout=LAYOUT, priority=20)
