"""The bad-input table: every kind of messy input the data layer knows, generated on a tiny set, with the message
it gives (paths relative to the data set) and what --skip-bad does with it.

    python benchmarks/bad_inputs.py              # one JSON line: {"benchmark": "bad_inputs", "rows": [...]}
    python benchmarks/bad_inputs.py --markdown   # the same as a Markdown table (the README's)
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vision.data import (  # noqa: E402
    DatasetError,
    SplitNotFoundError,
    load_detection_dataset,
    write_coco,
    write_labelme,
    write_voc,
    write_yolo,
)

WRITERS = {"coco": write_coco, "yolo": write_yolo, "voc": write_voc, "labelme": write_labelme}
CLASSES = ["cat", "dog", "fox"]
N = 3  # images per generated set, 2 boxes each


def _samples() -> list:
    rng = np.random.default_rng(0)
    out = []
    for i in range(N):
        img = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
        boxes = np.array([[2, 3, 20, 30], [30, 10, 60, 40]], dtype=np.float32) + i
        out.append((f"img_{i:03d}.jpg", img, boxes, np.array([i % 3, (i + 1) % 3])))
    return out


def _json_edit(path: Path, fn: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + line + "\n")


def _voc_sub(path: Path, tag: str, value: str) -> None:
    path.write_text(re.sub(rf"<{tag}>[^<]*</{tag}>", f"<{tag}>{value}</{tag}>", path.read_text(), count=1))


def _img(root: Path, fmt: str, i: int = 1) -> Path:
    sub = {"coco": "images/train", "yolo": "images/train", "voc": "JPEGImages", "labelme": "train"}[fmt]
    return root / sub / f"img_{i:03d}.jpg"


COCO_JSON = "annotations/instances_train.json"
YOLO_LABEL = "labels/train/img_001.txt"
VOC_XML = "Annotations/img_001.xml"


def _save_as_png(img: Path) -> None:
    from PIL import Image

    with Image.open(img) as im:
        im.save(img.with_suffix(".png"))


def _yolo_list(root: Path) -> None:
    (root / "train.txt").write_text("".join(f"./images/train/img_{i:03d}.jpg\n" for i in range(N)))
    (root / "data.yaml").write_text("train: train.txt\nval: train.txt\nnames: [cat, dog, fox]\n")


CASES: list[tuple[str, str, Callable[[Path], None]]] = [
    ("not an image (text saved as .jpg)", "yolo", lambda r: _img(r, "yolo").write_text("<html>not an image</html>")),
    ("zero-byte image", "coco", lambda r: _img(r, "coco").write_bytes(b"")),
    ("truncated JPEG (copy cut short)", "voc", lambda r: _img(r, "voc").write_bytes(_img(r, "voc").read_bytes()[:-400])),
    ("COCO image listed but missing on disk", "coco", lambda r: _img(r, "coco").unlink()),
    ("YOLO image list entry missing on disk", "yolo", lambda r: (_yolo_list(r), _img(r, "yolo").unlink())),
    ("label file not UTF-8", "yolo", lambda r: (r / YOLO_LABEL).write_bytes(b"0 0.5 0.5 0.2 0.2 \xff\n")),
    ("image list not UTF-8", "yolo", lambda r: (_yolo_list(r), (r / "train.txt").write_bytes(b"./images/train/caf\xe9.jpg\n"))),
    ("invalid data.yaml", "yolo", lambda r: (r / "data.yaml").write_text("train: [images/train\nnames: [a]\n")),
    ("YOLO line with the wrong field count", "yolo", lambda r: _append(r / YOLO_LABEL, "1 0.5 0.5 0.2")),
    ("YOLO non-numeric field", "yolo", lambda r: _append(r / YOLO_LABEL, "1 0.5 abc 0.2 0.2")),
    ("YOLO non-integer class", "yolo", lambda r: _append(r / YOLO_LABEL, "1.5 0.5 0.5 0.2 0.2")),
    ("YOLO class id not in names", "yolo", lambda r: _append(r / YOLO_LABEL, "7 0.5 0.5 0.2 0.2")),
    ("YOLO coordinates outside 0..1", "yolo", lambda r: _append(r / YOLO_LABEL, "1 1.2 0.5 0.2 0.2")),
    ("YOLO box beyond the edge by < 1 px", "yolo", lambda r: _append(r / YOLO_LABEL, "1 0.5 0.5 1.01 0.5")),
    ("YOLO box of zero width", "yolo", lambda r: _append(r / YOLO_LABEL, "1 0.5 0.5 0.0 0.2")),
    ("COCO box wholly outside the image", "coco",
     lambda r: _json_edit(r / COCO_JSON, lambda d: d["annotations"][2].update(bbox=[100, 100, 10, 10]))),
    ("COCO unknown category", "coco",
     lambda r: _json_edit(r / COCO_JSON, lambda d: d["annotations"][2].update(category_id=99))),
    ("COCO annotation of an unknown image id", "coco",
     lambda r: _json_edit(r / COCO_JSON, lambda d: d["annotations"][2].update(image_id=1234))),
    ("COCO two images sharing one id", "coco",
     lambda r: _json_edit(r / COCO_JSON, lambda d: d["images"][2].update(id=2))),
    ("COCO one file listed under two ids", "coco",
     lambda r: _json_edit(r / COCO_JSON, lambda d: (d["images"].append({**d["images"][1], "id": 99}),
                                                    d["annotations"].append({**d["annotations"][0], "id": 999,
                                                                             "image_id": 99})))),
    ("YOLO x.jpg and x.png sharing labels/x.txt", "yolo",
     lambda r: _save_as_png(_img(r, "yolo"))),
    ("COCO image id that is a list", "coco",
     lambda r: _json_edit(r / COCO_JSON, lambda d: d["images"][1].update(id=[2]))),
    ("COCO bbox not 4 numbers", "coco",
     lambda r: _json_edit(r / COCO_JSON, lambda d: d["annotations"][2].update(bbox=[1, 2, 3]))),
    ("VOC id listed, XML missing", "voc", lambda r: (r / VOC_XML).unlink()),
    ("VOC id listed, image missing", "voc", lambda r: _img(r, "voc").unlink()),
    ("VOC malformed XML", "voc", lambda r: (r / VOC_XML).write_text("<annotation><object>")),
    ("VOC non-numeric box", "voc", lambda r: _voc_sub(r / VOC_XML, "xmin", "abc")),
    ("VOC xmax < xmin", "voc", lambda r: (_voc_sub(r / VOC_XML, "xmin", "15"), _voc_sub(r / VOC_XML, "xmax", "10"))),
    ("VOC class not in labels.txt", "voc", lambda r: _voc_sub(r / VOC_XML, "name", "zebra")),
    ("LabelMe invalid JSON", "labelme", lambda r: (r / "train" / "img_001.json").write_text("{oops")),
    ("LabelMe rectangle with one point", "labelme",
     lambda r: _json_edit(r / "train" / "img_001.json", lambda d: d["shapes"][0].update(points=[[1, 2]]))),
    ("val split absent", "yolo", lambda r: (r / "data.yaml").write_text("train: images/train\nnames: [cat, dog, fox]\n")),
]


def _short(msg: str, root: Path) -> str:
    msg = msg.replace(str(root) + "/", "").replace(str(root), ".").split("\n(--skip-bad")[0]
    return re.sub(r"\s+", " ", msg)


def run_case(name: str, fmt: str, edit: Callable[[Path], None], tmp: Path) -> dict:
    """Generate a clean set, apply the edit, load it without and with --skip-bad."""
    root = tmp / re.sub(r"\W+", "_", name)
    WRITERS[fmt](root, "train", _samples(), CLASSES)
    edit(root)
    split = "val" if "split absent" in name else "train"
    row = {"case": name, "format": fmt}
    warned: list[str] = []
    catcher = logging.Handler(logging.WARNING)
    catcher.emit = lambda rec: warned.append(rec.getMessage())  # type: ignore[method-assign]
    data_log = logging.getLogger("negvision.data")
    data_log.addHandler(catcher)
    try:
        ds = load_detection_dataset(root, split, progress=False)
        row.update(kind="", message=_short(" ".join(warned), root), default="accepted, with this warning"
                   if warned else "accepted",
                   images=len(ds), boxes=sum(len(ds.annotations(i)[1]) for i in range(len(ds))))
    except SplitNotFoundError as e:
        row.update(kind="no_split", message=_short(str(e), root), default="absent split: trains without validation")
        return row
    except DatasetError as e:
        row.update(kind=e.kind, message=_short(str(e), root), default="error (exit 1)")
    finally:
        data_log.removeHandler(catcher)
    if row["default"].startswith("accepted"):
        row["skip_bad"] = "-"
        return row
    try:
        ds = load_detection_dataset(root, split, skip_bad=True, progress=False)
    except DatasetError:
        row["skip_bad"] = "not skippable (the whole set is unreadable)"
        return row
    n_img, n_box = len(ds), sum(len(ds.annotations(i)[1]) for i in range(len(ds)))
    row.update(images_kept=n_img, boxes_kept=n_box)
    if n_img == N:
        row["skip_bad"] = f"that line / annotation dropped, every image kept ({n_box} boxes)"
    else:
        row["skip_bad"] = f"{N - n_img} image{'s' if N - n_img > 1 else ''} skipped"
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table instead of JSON")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        rows = [run_case(n, f, e, Path(d)) for n, f, e in CASES]
    if args.markdown:
        print("| bad input | format | kind | message | default | `--skip-bad` |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in rows:
            msg = r["message"].replace("|", "\\|").replace("\n", " ")
            print(f"| {r['case']} | {r['format']} | {r['kind'] or '-'} | `{msg}` | {r['default']} | {r.get('skip_bad', '-')} |"
                  if msg else f"| {r['case']} | {r['format']} | - | - | {r['default']} | - |")
    else:
        print(json.dumps({"benchmark": "bad_inputs", "cases": len(rows), "rows": rows}))


if __name__ == "__main__":
    main()
