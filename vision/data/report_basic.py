"""``vision``'s own sections of ``negvision data report``: what is in each split (counts per class, good / defective
for the defect layouts), box geometry at the training resolution against the ATSS anchor scales, duplicates and
leakage across splits (content hash + perceptual hash), and box problems (tiny, degenerate, double labels).

Every section is ``fn(ctx: ReportContext) -> ReportSection | None`` registered with
:func:`vision.data.report_sections.register_section`; ``None``: the section does not apply (no boxes in a defect
layout).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .report_html import esc, figure_data_uri, img_tag, problem_list, table, thumb_tag
from .report_sections import ReportContext, ReportSection, register_section

log = logging.getLogger("negvision.data")

# The ATSS anchors the boxes are drawn against: one square anchor of side 8 x stride per location on P3-P7
# (detectors.atss.model: STRIDES, anchor_scale=8; repeated here because vision does not import detectors).
ATSS_STRIDES = (8, 16, 32, 64, 128)
ATSS_ANCHOR_SCALE = 8
ANCHOR_SIZES = tuple(ATSS_ANCHOR_SCALE * s for s in ATSS_STRIDES)  # 64 .. 1024 px

# defaults of the options the sections read from ``ctx.options``
# Hamming distance (of 64 bits) at or below which two perceptual hashes are near duplicates, chosen on the validation
# seed of benchmarks/data_report.py at three sizes: 312 images (2 and 4 both find every planted resized + re-encoded
# copy with no other pair), 3,120 (F1 0.984 at 2 vs 0.916 at 4: 11 pairs of distinct images on a shared background
# crop) and 20,800 (0.948 vs 0.760: 34 vs 250 such pairs; recall 0.978 vs 0.995)
NEAR_THRESHOLD = 2
OVERLAP_IOU = 0.9  # two same-class boxes of one image above this IoU: a probable double label
TINY_PX = 2.0  # a box whose shorter side is at most this many pixels at --img-size is tiny
RARE_BOXES = 10  # a class with fewer training boxes than this is reported as rare
MAX_THUMBS = 24  # duplicate pairs / box problems shown with pictures per list (all of them are in report.json)
MAX_JSON_ITEMS = 5000  # longest list of items (pairs, boxes) written to report.json; counts are always complete


def option(ctx: ReportContext, name: str, default: Any) -> Any:
    """``ctx.options[name]``, ``default`` when absent or None."""
    v = ctx.options.get(name)
    return default if v is None else v


def is_detection(ctx: ReportContext) -> bool:
    """True when the report's splits are detection datasets (boxes), False for a defect layout."""
    return all(hasattr(ds, "annotations") for ds in ctx.splits.values())


def split_images(ds: Any) -> list[Path]:
    """The image paths of one loaded split (detection dataset or checked defect split)."""
    if hasattr(ds, "image_paths"):
        return list(ds.image_paths)
    return [s.image for s in ds.samples]


def _rel(ctx: ReportContext, path: Path) -> str:
    """``path`` relative to the data folder when it lies inside it (shorter lines)."""
    root = ctx.data if ctx.data.is_dir() else ctx.data.parent
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _cap(items: list, n: int = MAX_JSON_ITEMS) -> list:
    return items[:n]


# ------------------------------------------------------------------------------------------------------ hashing


@dataclass
class ImageHashes:
    """Every image of every split with its content hash (decoded RGB pixels) and 64-bit perceptual hash."""

    split: list[str]
    path: list[Path]
    content: list[str]  # blake2b of the decoded pixels and their shape ("" when the image could not be decoded)
    phash: np.ndarray  # uint64 [N]
    errors: list[str]
    seconds: float


def _hash_one(path: Path) -> tuple[str, int, str]:
    """(content hash, perceptual hash, error) of one image, decoded as training decodes it (EXIF applied, RGB)."""
    import imagehash

    from vision.io import ImageReadError, open_image

    try:
        im = open_image(path, "RGB")
    except ImageReadError as e:
        return "", 0, str(e)
    arr = np.asarray(im)
    h = hashlib.blake2b(arr.tobytes(), digest_size=16)
    h.update(repr(arr.shape).encode())
    ph = imagehash.phash(im)  # DCT hash of the 32 x 32 grey image, 8 x 8 low frequencies -> 64 bits
    return h.hexdigest(), int(str(ph), 16), ""


def image_hashes(ctx: ReportContext, progress: bool = False, workers: int | None = None) -> ImageHashes:
    """Hash every image of every split once per report (kept in ``ctx.cache["hashes"]``); a file listed in two
    splits is decoded once."""
    if "hashes" in ctx.cache:
        return ctx.cache["hashes"]
    from vision.progress import progress_bar

    t0 = time.perf_counter()
    splits, paths = [], []
    for name, ds in ctx.splits.items():
        for p in split_images(ds):
            splits.append(name)
            paths.append(Path(p))
    unique = list(dict.fromkeys(paths))
    workers = workers or min(4, os.cpu_count() or 1)
    bar = progress_bar(len(unique), desc="hashing images", unit="img", leave=False,
                       enabled=progress and len(unique) >= 200)
    results: dict[Path, tuple[str, int, str]] = {}

    def run(p: Path) -> tuple[str, int, str]:
        r = _hash_one(p)
        bar.update(1)
        return r

    try:
        if workers <= 1 or len(unique) < 32:
            out = [run(p) for p in unique]
        else:
            with ThreadPoolExecutor(workers) as pool:  # PIL decodes and resizes without the GIL
                out = list(pool.map(run, unique, chunksize=16))
    finally:
        bar.close()
    results = dict(zip(unique, out, strict=True))
    errors = [results[p][2] for p in unique if results[p][2]]
    hashes = ImageHashes(
        split=splits, path=paths, content=[results[p][0] for p in paths],
        phash=np.array([results[p][1] for p in paths], dtype=np.uint64), errors=errors,
        seconds=time.perf_counter() - t0,
    )
    ctx.cache["hashes"] = hashes
    return hashes


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x)
    b = x.view(np.uint8).reshape(*x.shape, 8)  # pragma: no cover - older numpy
    return np.unpackbits(b, axis=-1).sum(-1)


def near_pairs(phash: np.ndarray, threshold: int, chunk: int = 1024) -> list[tuple[int, int, int]]:
    """(i, j, Hamming distance) of every pair i < j whose 64-bit hashes differ in at most ``threshold`` bits
    (all pairs, in row chunks: N = 20,000 takes seconds)."""
    n = len(phash)
    out: list[tuple[int, int, int]] = []
    for s in range(0, n, chunk):
        block = _popcount(phash[s:s + chunk, None] ^ phash[None, :])  # [c, N]
        ii, jj = np.nonzero(block <= threshold)
        keep = jj > ii + s
        for i, j in zip(ii[keep].tolist(), jj[keep].tolist(), strict=True):
            out.append((i + s, j, int(block[i, j])))
    return out


# ------------------------------------------------------------------------------------------------------- counts


def _bar_chart(ctx: ReportContext, classes: list[str], per: dict[str, dict[str, dict[str, int]]]) -> str:
    """Grouped bars: boxes and images per class, one colour per split."""
    from vision.viz import new_figure

    n = len(classes)
    fig = new_figure((max(6.0, min(30.0, 1.2 + 0.35 * n * max(1, len(per)))), 5.6))
    x = np.arange(n)
    width = 0.8 / max(1, len(per))
    for row, key in enumerate(("boxes", "images")):
        ax = fig.add_subplot(2, 1, row + 1)
        for k, (split, counts) in enumerate(per.items()):
            ax.bar(x + (k - (len(per) - 1) / 2) * width, [counts[c][key] for c in classes], width, label=split)
        ax.set_ylabel(key)
        ax.set_xticks(x, classes if n <= 60 else [""] * n, rotation=90 if n > 12 else 0, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        if row == 0:
            ax.set_title("Boxes (top) and images (bottom) per class")
            ax.legend(fontsize=8)
    return img_tag(figure_data_uri(fig), "per-class boxes and images per split", "chart")


@register_section("counts", order=10)
def counts_section(ctx: ReportContext) -> ReportSection:
    """Per split: images, empty images, boxes, per-class images and boxes, classes absent from a split; for a defect
    layout: good / defective images."""
    if not is_detection(ctx):
        return _defect_counts(ctx)
    rare = int(option(ctx, "rare_boxes", RARE_BOXES))
    classes = list(next(iter(ctx.splits.values())).classes) if ctx.splits else []
    splits: dict[str, Any] = {}
    per_class: dict[str, dict[str, dict[str, int]]] = {}
    problems: list[str] = []
    for name, ds in ctx.splits.items():
        boxes_of = np.zeros(len(classes), dtype=np.int64)
        images_of = np.zeros(len(classes), dtype=np.int64)
        empty = n_boxes = 0
        for i in range(len(ds)):
            _, labels = ds.annotations(i)
            n_boxes += len(labels)
            empty += len(labels) == 0
            if len(labels):
                np.add.at(boxes_of, labels, 1)
                images_of[np.unique(labels)] += 1
        per_class[name] = {c: {"boxes": int(boxes_of[k]), "images": int(images_of[k])} for k, c in enumerate(classes)}
        absent = [c for k, c in enumerate(classes) if boxes_of[k] == 0]
        splits[name] = {"images": len(ds), "empty_images": int(empty), "boxes": int(n_boxes),
                        "classes_present": len(classes) - len(absent), "classes_absent": absent,
                        "skipped": len(getattr(ds, "bad", []))}
    for c in classes:
        counts = {s: per_class[s][c]["boxes"] for s in per_class}
        if not any(counts.values()):
            problems.append(f"class '{c}' has no box in any split")
            continue
        for s, n in counts.items():
            if n == 0:
                problems.append(f"class '{c}' has no box in split '{s}' ({', '.join(f'{t}: {m}' for t, m in counts.items() if m)})")
        if "train" in counts and 0 < counts["train"] < rare:
            problems.append(f"class '{c}' has only {counts['train']} box{'es' if counts['train'] != 1 else ''} in "
                            f"split 'train' (fewer than {rare})")
    figures = {"kind": "detection", "classes": classes, "splits": splits, "per_class": per_class,
               "rare_boxes": rare}
    rows = [[s, v["images"], v["empty_images"], v["boxes"], v["classes_present"], ", ".join(v["classes_absent"]) or "-"]
            for s, v in splits.items()]
    html = table(["split", "images", "empty images", "boxes", "classes present", "classes absent"], rows)
    class_rows = [[c] + [x for s in per_class for x in (per_class[s][c]["images"], per_class[s][c]["boxes"])]
                  for c in classes]
    header = ["class"] + [f"{s} {w}" for s in per_class for w in ("images", "boxes")]
    if classes:
        html += _bar_chart(ctx, classes, per_class) + table(header, class_rows, "per-class")
    return ReportSection("Images, boxes and classes per split", figures, problem_list(problems) + html, problems)


def _defect_counts(ctx: ReportContext) -> ReportSection:
    from vision.viz import new_figure

    splits: dict[str, Any] = {}
    for name, ds in ctx.splits.items():
        samples = ds.samples
        bad = sum(1 for s in samples if s.label == 1)
        masked = sum(1 for s in samples if s.label == 1 and s.has_mask and s.segmented)
        splits[name] = {"images": len(samples), "good": len(samples) - bad, "defective": bad,
                        "defective_with_mask": masked, "skipped": len(ds.bad)}
    problems = [f"split '{s}' has no defective image" for s, v in splits.items() if v["defective"] == 0]
    problems += [f"split '{s}' has no defect-free image" for s, v in splits.items() if v["good"] == 0]
    fig = new_figure((5.0, 3.2))
    ax = fig.add_subplot()
    names = list(splits)
    good = [splits[s]["good"] for s in names]
    ax.bar(names, good, label="good", color="tab:green")
    ax.bar(names, [splits[s]["defective"] for s in names], bottom=good, label="defective", color="tab:red")
    ax.set_ylabel("images")
    ax.set_title("Good and defective images per split")
    ax.legend(fontsize=8)
    rows = [[s, v["images"], v["good"], v["defective"], v["defective_with_mask"]] for s, v in splits.items()]
    html = problem_list(problems) + table(["split", "images", "good", "defective", "defective with pixel mask"], rows)
    html += img_tag(figure_data_uri(fig), "good and defective images per split", "chart")
    return ReportSection("Good and defective images per split", {"kind": "defect", "splits": splits}, html, problems)


# ----------------------------------------------------------------------------------------------- box geometry


@dataclass
class ScaledBoxes:
    """Every box of one split at the training resolution (letterbox: the image's longer side -> img_size)."""

    image: np.ndarray  # int [M] index of the image in its split
    box: np.ndarray  # float [M, 4] xyxy in original pixels
    label: np.ndarray  # int [M]
    scale: np.ndarray  # float [M] img_size / max(W, H) of the box's image
    wh: np.ndarray  # float [M, 2] width, height at img_size
    centre: np.ndarray  # float [M, 2] centre / image size (0..1)


def scaled_boxes(ctx: ReportContext, split: str) -> ScaledBoxes:
    """The boxes of ``split`` at ``ctx.img_size`` (cached per report)."""
    key = ("scaled_boxes", split)
    if key in ctx.cache:
        return ctx.cache[key]
    ds = ctx.splits[split]
    items = getattr(ds, "_items", None)
    idx, boxes, labels, scales, sizes = [], [], [], [], []
    for i in range(len(ds)):
        b, lab = ds.annotations(i)
        if items is not None:
            w, h = items[i].width, items[i].height
        else:  # pragma: no cover - a dataset without records: the image header
            from PIL import Image

            with Image.open(ds.image_paths[i]) as im:
                w, h = im.size
        idx.append(np.full(len(lab), i))
        boxes.append(b.reshape(-1, 4))
        labels.append(lab)
        scales.append(np.full(len(lab), ctx.img_size / max(w, h)))
        sizes.append(np.tile([w, h], (len(lab), 1)))
    cat = (lambda xs, shape: np.concatenate(xs) if xs else np.zeros(shape))  # noqa: E731
    box = cat(boxes, (0, 4)).astype(np.float64)
    scale = cat(scales, (0,)).astype(np.float64)
    size = cat(sizes, (0, 2)).astype(np.float64)
    wh = (box[:, 2:] - box[:, :2]) * scale[:, None]
    centre = (box[:, :2] + box[:, 2:]) / 2 / np.maximum(size, 1)
    out = ScaledBoxes(cat(idx, (0,)).astype(np.int64), box, cat(labels, (0,)).astype(np.int64), scale, wh, centre)
    ctx.cache[key] = out
    return out


QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


def _quantiles(x: np.ndarray) -> dict[str, float]:
    if len(x) == 0:
        return {}
    return {f"p{round(q * 100)}": float(v) for q, v in zip(QUANTILES, np.quantile(x, QUANTILES), strict=True)} | {
        "min": float(x.min()), "max": float(x.max()), "mean": float(x.mean())}


def _nearest_level(side: np.ndarray) -> np.ndarray:
    """Index of the ATSS level whose anchor (8 x stride) is nearest to each box side (sqrt of the area), in log."""
    if len(side) == 0:
        return np.zeros(0, dtype=np.int64)
    d = np.abs(np.log2(np.maximum(side, 1e-6))[:, None] - np.log2(np.array(ANCHOR_SIZES))[None, :])
    return d.argmin(1)


def _anchor_lines(ax: Any, vertical: bool = True) -> None:
    for k, a in enumerate(ANCHOR_SIZES):
        (ax.axvline if vertical else ax.axhline)(a, color="tab:red", ls="--", lw=0.8, alpha=0.7,
                                                 label="ATSS anchors 8 x stride (P3-P7)" if k == 0 else None)


def _geometry_charts(ctx: ReportContext, data: dict[str, ScaledBoxes]) -> str:
    from vision.viz import new_figure

    size = ctx.img_size
    all_wh = np.concatenate([d.wh for d in data.values()]) if data else np.zeros((0, 2))
    lo = max(0.5, float(all_wh.min()) * 0.8) if len(all_wh) else 1.0
    hi = max(float(all_wh.max()) * 1.25 if len(all_wh) else size, ANCHOR_SIZES[-1] * 1.1)
    bins = np.geomspace(lo, hi, 40)
    fig = new_figure((11.0, 7.0))
    panels = (("width", lambda d: d.wh[:, 0]), ("height", lambda d: d.wh[:, 1]),
              ("sqrt(width x height)", lambda d: np.sqrt(d.wh[:, 0] * d.wh[:, 1])))
    for k, (name, fn) in enumerate(panels):
        ax = fig.add_subplot(2, 2, k + 1)
        for split, d in data.items():
            ax.hist(fn(d), bins=bins, histtype="step", lw=1.4, label=split)
        _anchor_lines(ax)
        ax.set_xscale("log")
        ax.set_xlabel(f"box {name}, px at --img-size {size}")
        ax.set_ylabel("boxes")
        if k == 0:
            ax.legend(fontsize=7)
    ax = fig.add_subplot(2, 2, 4)
    ar_bins = np.geomspace(1 / 16, 16, 41)
    for split, d in data.items():
        ar = d.wh[:, 0] / np.maximum(d.wh[:, 1], 1e-6)
        ax.hist(np.clip(ar, ar_bins[0], ar_bins[-1]), bins=ar_bins, histtype="step", lw=1.4, label=split)
    ax.axvline(1.0, color="tab:red", ls="--", lw=0.8, alpha=0.7, label="ATSS anchor (square)")
    ax.set_xscale("log")
    ax.set_xlabel("aspect ratio width / height")
    ax.set_ylabel("boxes")
    ax.legend(fontsize=7)
    charts = img_tag(figure_data_uri(fig), "box widths, heights, sizes and aspect ratios against the ATSS anchors",
                     "chart")

    fig = new_figure((11.0, 4.6))
    ax = fig.add_subplot(1, 2, 1)
    cen = np.concatenate([d.centre for d in data.values()]) if data else np.zeros((0, 2))
    h2 = ax.hist2d(cen[:, 0], cen[:, 1], bins=20, range=[[0, 1], [0, 1]], cmap="viridis") if len(cen) else None
    ax.set_xlim(0, 1)
    ax.set_ylim(1, 0)  # image coordinates: y down
    ax.set_aspect("equal")
    ax.set_xlabel("box centre x / image width")
    ax.set_ylabel("box centre y / image height")
    ax.set_title("Box centres (all splits)")
    if h2 is not None:
        fig.colorbar(h2[3], ax=ax, label="boxes")
    ax = fig.add_subplot(1, 2, 2)
    if len(all_wh):
        ax.hist2d(np.log2(np.maximum(all_wh[:, 0], 0.5)), np.log2(np.maximum(all_wh[:, 1], 0.5)), bins=40,
                  range=[[np.log2(lo), np.log2(hi)]] * 2, cmap="viridis", cmin=1)
    la = np.log2(np.array(ANCHOR_SIZES))
    ax.plot(la, la, "s", mfc="none", mec="tab:red", ms=9, label="ATSS anchors P3-P7 (8 x stride)")
    for s, a in zip(ATSS_STRIDES, la, strict=True):
        ax.annotate(f"P{int(np.log2(s))}", (a, a), textcoords="offset points", xytext=(6, -10), fontsize=7,
                    color="tab:red")
    ticks = [t for t in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048) if lo <= t <= hi]
    ax.set_xticks(np.log2(ticks), [str(t) for t in ticks])
    ax.set_yticks(np.log2(ticks), [str(t) for t in ticks])
    ax.set_xlabel(f"box width, px at {size}")
    ax.set_ylabel(f"box height, px at {size}")
    ax.set_title("Box width x height (all splits)")
    ax.legend(fontsize=7, loc="upper left")
    return charts + img_tag(figure_data_uri(fig), "box centres and width x height against the ATSS anchors", "chart")


@register_section("geometry", order=20)
def geometry_section(ctx: ReportContext) -> ReportSection | None:
    """Box widths, heights, aspect ratios and centres at the training resolution, against the ATSS anchor scales."""
    if not is_detection(ctx):
        return None
    data = {s: scaled_boxes(ctx, s) for s in ctx.splits}
    splits: dict[str, Any] = {}
    rows = []
    for s, d in data.items():
        side = np.sqrt(d.wh[:, 0] * d.wh[:, 1])
        ar = d.wh[:, 0] / np.maximum(d.wh[:, 1], 1e-9)
        levels = np.bincount(_nearest_level(side), minlength=len(ANCHOR_SIZES))
        hist, _, _ = np.histogram2d(d.centre[:, 0], d.centre[:, 1], bins=10, range=[[0, 1], [0, 1]])
        below = int((side < ANCHOR_SIZES[0] / 2).sum())
        splits[s] = {
            "boxes": len(side), "width": _quantiles(d.wh[:, 0]), "height": _quantiles(d.wh[:, 1]),
            "sqrt_area": _quantiles(side), "aspect_ratio": _quantiles(ar),
            "nearest_anchor_level": {f"P{int(np.log2(st))}": int(n)
                                     for st, n in zip(ATSS_STRIDES, levels.tolist(), strict=True)},
            "below_half_smallest_anchor": below,
            "centre_histogram_10x10": hist.T.astype(int).tolist(),  # rows = y, columns = x
        }
        q = splits[s]["sqrt_area"]
        rows.append([s, len(side), q.get("p5", 0.0), q.get("p50", 0.0), q.get("p95", 0.0),
                     splits[s]["aspect_ratio"].get("p50", 0.0), below,
                     " / ".join(str(n) for n in levels.tolist())])
    figures = {"img_size": ctx.img_size, "anchor_sizes": list(ANCHOR_SIZES), "strides": list(ATSS_STRIDES),
               "splits": splits}
    problems = []
    for s, v in splits.items():
        n = v["boxes"]
        if n and v["below_half_smallest_anchor"] / n > 0.25:
            problems.append(f"split '{s}': {v['below_half_smallest_anchor']} of {n} boxes are smaller than half the "
                            f"smallest ATSS anchor ({ANCHOR_SIZES[0] // 2} px at --img-size {ctx.img_size}); a larger "
                            "--img-size would help")
    html = (f'<p>Sizes in pixels after letterboxing each image to <b>--img-size {ctx.img_size}</b> (longer side). '
            f"Red lines: the ATSS anchor sides 8 x stride = {', '.join(map(str, ANCHOR_SIZES))} px (P3-P7).</p>")
    html += problem_list(problems)
    html += table(["split", "boxes", "side p5", "side median", "side p95", "aspect median",
                   f"side < {ANCHOR_SIZES[0] // 2} px", "nearest anchor P3/P4/P5/P6/P7"], rows)
    if any(len(d.wh) for d in data.values()):
        html += _geometry_charts(ctx, data)
    return ReportSection(f"Box sizes and positions at {ctx.img_size} px", figures, html, problems)


# --------------------------------------------------------------------------------------------------- duplicates


def _groups(h: ImageHashes) -> list[list[int]]:
    by: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(h.content):
        if c:
            by[c].append(i)
    return [g for g in by.values() if len(g) > 1]


def _pair_html(ctx: ReportContext, h: ImageHashes, members: list[int], what: str) -> str:
    thumbs = "".join(thumb_tag(h.path[i], f"[{h.split[i]}] {_rel(ctx, h.path[i])}") for i in members[:4])
    more = f"<div class='what'>... and {len(members) - 4} more</div>" if len(members) > 4 else ""
    return f'<div class="pair"><div class="what">{esc(what)}</div>{thumbs}{more}</div>'


@register_section("duplicates", order=30)
def duplicates_section(ctx: ReportContext) -> ReportSection:
    """Exact duplicates (same decoded pixels) and near duplicates (perceptual-hash distance <= threshold), within
    and across splits; any across-split duplicate is leakage (severe)."""
    threshold = int(option(ctx, "near_threshold", NEAR_THRESHOLD))
    h = image_hashes(ctx, progress=bool(option(ctx, "progress", False)))
    item = lambda i: {"split": h.split[i], "path": _rel(ctx, h.path[i])}  # noqa: E731
    groups = _groups(h)
    exact = []
    for g in groups:
        names = sorted({h.split[i] for i in g})
        exact.append({"images": [item(i) for i in g], "splits": names, "across": len(names) > 1})
    pairs = []
    for i, j, d in near_pairs(h.phash, threshold):
        if h.content[i] and h.content[i] == h.content[j]:
            continue  # already an exact duplicate
        if not h.content[i] or not h.content[j]:
            continue
        pairs.append({"a": item(i), "b": item(j), "distance": d, "across": h.split[i] != h.split[j], "_ij": (i, j)})
    pairs.sort(key=lambda p: (not p["across"], p["distance"]))
    by_pair: dict[str, dict[str, int]] = defaultdict(lambda: {"exact_groups": 0, "near_pairs": 0})
    for e in exact:
        key = "-".join(e["splits"]) if e["across"] else e["splits"][0]
        by_pair[key]["exact_groups"] += 1
    for p in pairs:
        key = "-".join(sorted({p["a"]["split"], p["b"]["split"]}))
        by_pair[key]["near_pairs"] += 1
    n_exact_across = sum(e["across"] for e in exact)
    n_near_across = sum(p["across"] for p in pairs)
    in_across = {i for g in groups if len({h.split[k] for k in g}) > 1 for i in g}
    in_across |= {k for p in pairs if p["across"] for k in p["_ij"]}
    problems = []
    for e in exact:
        if e["across"]:
            problems.append("exact duplicate across splits: " + " = ".join(f"[{x['split']}] {x['path']}" for x in e["images"]))
    for p in pairs:
        if p["across"]:
            problems.append(f"near duplicate across splits (distance {p['distance']}): [{p['a']['split']}] {p['a']['path']}"
                            f" ~ [{p['b']['split']}] {p['b']['path']}")
    n_exact_within = len(exact) - n_exact_across
    n_near_within = len(pairs) - n_near_across
    if n_exact_within:
        problems.append(f"{n_exact_within} group{'s' if n_exact_within != 1 else ''} of exact duplicates within a split")
    if n_near_within:
        problems.append(f"{n_near_within} near-duplicate pair{'s' if n_near_within != 1 else ''} within a split")
    problems += [f"not hashed: {e}" for e in h.errors]
    severe = bool(n_exact_across or n_near_across)
    figures = {
        "hash": "content: blake2b of the decoded RGB pixels; near: imagehash.phash (64 bits), Hamming distance",
        "near_threshold": threshold, "images_hashed": len(h.path),
        "exact": {"groups": len(exact), "across_groups": n_exact_across, "within_groups": n_exact_within,
                  "list": _cap(exact)},
        "near": {"pairs": len(pairs), "across_pairs": n_near_across, "within_pairs": n_near_within,
                 "list": _cap([{k: v for k, v in p.items() if k != "_ij"} for p in pairs])},
        "images_leaked": len(in_across),
        "by_splits": dict(by_pair),
        "errors": h.errors,
    }
    tag = ('<span class="severe-tag">leakage</span>' if severe else '<span class="ok-tag">no leakage found</span>')
    html = (f"<p>{tag}: {n_exact_across} exact and {n_near_across} near duplicate"
            f"{'s' if n_near_across != 1 else ''} across splits ({len(in_across)} images); {n_exact_within} exact "
            f"group{'s' if n_exact_within != 1 else ''} and {n_near_within} near pair{'s' if n_near_within != 1 else ''} "
            f"within a split. Exact: same decoded pixels. Near: perceptual-hash (pHash, 64 bits) distance &le; "
            f"{threshold} (--near-threshold), not exact.</p>")
    html += problem_list(problems)
    if by_pair:
        html += table(["splits", "exact groups", "near pairs"],
                      [[k, v["exact_groups"], v["near_pairs"]] for k, v in sorted(by_pair.items())])
    blocks = []
    for across in (True, False):
        items = [("exact", g) for g, e in zip(groups, exact, strict=True) if e["across"] == across]
        items += [(f"near, distance {p['distance']}", list(p["_ij"])) for p in pairs if p["across"] == across]
        if not items:
            continue
        head = "Across splits (leakage)" if across else "Within a split"
        shown = "".join(_pair_html(ctx, h, members, what) for what, members in items[:MAX_THUMBS])
        more = f"<p class='note'>{len(items) - MAX_THUMBS} more in report.json</p>" if len(items) > MAX_THUMBS else ""
        blocks.append(f"<h3>{head}</h3><div>{shown}</div>{more}")
    html += "".join(blocks)
    return ReportSection("Duplicates and leakage", figures, html, problems, severe)


# ------------------------------------------------------------------------------------------------ box problems


def _overlaps(box: np.ndarray, label: np.ndarray, iou_min: float) -> list[tuple[int, int, float]]:
    """(a, b, IoU) of same-class box pairs of one image with IoU > ``iou_min``."""
    import torch
    from torchvision.ops import box_iou

    if len(box) < 2:
        return []
    iou = box_iou(torch.as_tensor(box, dtype=torch.float64), torch.as_tensor(box, dtype=torch.float64)).numpy()
    same = label[:, None] == label[None, :]
    a, b = np.nonzero(np.triu((iou > iou_min) & same, k=1))
    return [(int(x), int(y), float(iou[x, y])) for x, y in zip(a, b, strict=True)]


@register_section("box_problems", order=40)
def box_problems_section(ctx: ReportContext) -> ReportSection | None:
    """Boxes the readers accepted that will not train well: tiny at --img-size, heavy same-class overlaps (double
    labels); and those the readers dropped with --skip-bad (degenerate after clipping, outside the image)."""
    if not is_detection(ctx):
        return None
    from .formats import KIND_WORDS

    tiny_px = float(option(ctx, "tiny_px", TINY_PX))
    iou_min = float(option(ctx, "overlap_iou", OVERLAP_IOU))
    tiny, doubles, skipped = [], [], {}
    per_split: dict[str, Any] = {}
    for s, ds in ctx.splits.items():
        d = scaled_boxes(ctx, s)
        t = np.nonzero(d.wh.min(1) <= tiny_px)[0] if len(d.wh) else np.zeros(0, dtype=np.int64)
        for k in t.tolist():
            i = int(d.image[k])
            tiny.append({"split": s, "path": _rel(ctx, ds.image_paths[i]), "image": i,
                         "box": [round(v, 2) for v in d.box[k].tolist()], "class": ds.classes[d.label[k]],
                         "size_at_img_size": [round(v, 2) for v in d.wh[k].tolist()]})
        n_double = 0
        images, starts, counts = np.unique(d.image, return_index=True, return_counts=True)  # boxes are in image order
        for i, start, n in zip(images.tolist(), starts.tolist(), counts.tolist(), strict=True):
            if n < 2:
                continue
            sel = np.arange(start, start + n)
            for a, b, iou in _overlaps(d.box[sel], d.label[sel], iou_min):
                n_double += 1
                doubles.append({"split": s, "path": _rel(ctx, ds.image_paths[i]), "image": i,
                                "class": ds.classes[d.label[sel[a]]], "iou": round(iou, 4),
                                "boxes": [d.box[sel[a]].tolist(), d.box[sel[b]].tolist()]})
        kinds = ds.bad_kinds
        box_kinds = {k: n for k, n in kinds.items() if k in ("degenerate", "outside", "malformed")}
        skipped[s] = {"by_kind": kinds, "items": list(getattr(ds, "bad", []))}
        per_split[s] = {"boxes": len(d.wh), "tiny": int(len(t)), "double_labels": n_double,
                        "dropped_by_reader": box_kinds}
    problems = []
    for s, v in per_split.items():
        if v["tiny"]:
            problems.append(f"split '{s}': {v['tiny']} box{'es' if v['tiny'] != 1 else ''} of at most {tiny_px:g} px at "
                            f"--img-size {ctx.img_size}")
        if v["double_labels"]:
            problems.append(f"split '{s}': {v['double_labels']} pair{'s' if v['double_labels'] != 1 else ''} of "
                            f"same-class boxes with IoU > {iou_min:g} (probable double labels)")
        for k, n in v["dropped_by_reader"].items():
            problems.append(f"split '{s}': skipped by --skip-bad: {n} x {KIND_WORDS.get(k, k)} (listed under 'Skipped')")
    problems += [f"tiny box: [{x['split']}] {x['path']} class '{x['class']}' {x['box']} is "
                 f"{x['size_at_img_size'][0]:g} x {x['size_at_img_size'][1]:g} px at {ctx.img_size}" for x in tiny]
    problems += [f"double label: [{x['split']}] {x['path']} class '{x['class']}' two boxes with IoU {x['iou']:.3f}"
                 for x in doubles]
    figures = {"tiny_px": tiny_px, "overlap_iou": iou_min, "img_size": ctx.img_size, "splits": per_split,
               "tiny": _cap(tiny), "double_labels": _cap(doubles), "skipped_by_reader": skipped}
    html = (f"<p>Tiny: shorter side at most {tiny_px:g} px at --img-size {ctx.img_size}. Double label: two boxes of one "
            f"class in one image with IoU &gt; {iou_min:g} (--overlap-iou). Boxes degenerate after clipping or outside "
            "the image are refused by the readers (an error, or dropped with --skip-bad and counted here).</p>")
    html += table(["split", "boxes", "tiny", "double labels", "dropped by the reader"],
                  [[s, v["boxes"], v["tiny"], v["double_labels"],
                    ", ".join(f"{n} {KIND_WORDS.get(k, k)}" for k, n in v["dropped_by_reader"].items()) or "-"]
                   for s, v in per_split.items()])
    html += problem_list(problems)
    def caption(x: dict) -> str:
        if "iou" in x:
            return f"[{x['split']}] {x['path']}: class '{x['class']}', IoU {x['iou']:.2f}"
        w, h = x["size_at_img_size"]
        return f"[{x['split']}] {x['path']}: class '{x['class']}', {w:g} x {h:g} px"

    for title, items, key in (("Tiny boxes", tiny, "box"), ("Probable double labels", doubles, "boxes")):
        if not items:
            continue
        figs = []
        for x in items[:MAX_THUMBS]:
            ds = ctx.splits[x["split"]]
            b = np.array(x[key], dtype=np.float64).reshape(-1, 4)
            lab = np.full(len(b), ds.classes.index(x["class"]))
            focus = [b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()]
            figs.append(thumb_tag(ds.image_paths[x["image"]], caption(x), boxes=b, labels=lab,
                                  class_names=ds.classes, focus=focus))
        more = f"<p class='note'>{len(items) - MAX_THUMBS} more in report.json</p>" if len(items) > MAX_THUMBS else ""
        html += f"<h3>{esc(title)}</h3><div>{''.join(figs)}</div>{more}"
    return ReportSection("Box problems", figures, html, problems)
