"""The ``negvision data report`` section "what ATSS will do with these boxes".

Every training box is letterboxed to ``--img-size`` exactly as the ATSS model's ``GeneralizedRCNNTransform`` does
(``min_size = max_size = img_size``: scale = img_size / longer side, new side = floor(side x scale), boxes times
new / old side in float32), the anchors are the model's (``grid_anchors``: one square anchor of
``anchor_scale x stride`` per location of P3-P7 on the ``ceil32(img_size)`` square canvas that training with
augmentation feeds the network), and the project's own :func:`~detectors.atss.assigner.atss_assign` runs per image
with all of the image's boxes, as ``ATSS.compute_loss`` calls it. Reported per box: its positive anchors (after
anchors claimed by several boxes went to the highest IoU) and their pyramid levels. Only the annotations are read
for the figures; pixels are decoded for the thumbnails of the worst cases only.
"""

from __future__ import annotations

import base64
import html
import inspect
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from detectors.atss.assigner import atss_assign
from detectors.atss.model import ATSS, STRIDES, grid_anchors
from vision.data.report_sections import ReportContext, ReportSection, register_section

__all__ = [
    "ATSSParams",
    "AssignStats",
    "DatasetBoxes",
    "FixSuggestion",
    "MAX_SANE_IMG_SIZE",
    "anchor_grid",
    "assign_boxes",
    "atss_assignment_section",
    "dataset_boxes",
    "holds_anchor_centre",
    "letterbox_boxes",
    "suggest_fix",
    "zero_reasons",
]

LEVELS = tuple(f"P{int(math.log2(s))}" for s in STRIDES)  # P3..P7
SIZE_FACTORS = (1.25, 1.5, 2.0)  # --img-size candidates tried for the zero-positive boxes
SLICE_FACTORS = (3.0, 4.0)  # beyond a sane input size: the upscale a tiling (--slice) would have to give
MAX_SANE_IMG_SIZE = 2048  # a larger --img-size is not suggested; tiling is
MAX_STRIDE_FACTOR = 6.0  # the largest upscale tried to lift the shorter side of the boxes over the P3 stride
MAX_SUGGEST_IMAGES = 200  # the suggestion re-runs the assigner on at most this many affected images
NUM_THUMBNAILS = 12
THUMB_PX = 160  # thumbnails are THUMB_PX x THUMB_PX
REASONS = {
    "small": "smaller than the P3 stride, no anchor centre inside",
    "thin": "thinner than the P3 stride, no anchor centre inside",
    "overlap": "its anchors went to an overlapping box",
    "threshold": "no candidate reaches the adaptive IoU threshold",
}


# ----------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class ATSSParams:
    """The ATSS model settings the assignment depends on (defaults: those of :class:`~detectors.atss.ATSS`)."""

    topk: int = 9
    anchor_scale: float = 8.0
    size_divisible: int = 32
    assign_unmatched_gt: bool = False

    @classmethod
    def from_model(cls, **overrides: Any) -> ATSSParams:
        """The defaults of ``ATSS.__init__`` (so the report follows the model), with ``overrides`` applied."""
        params = inspect.signature(ATSS.__init__).parameters
        kw = {f: params[f].default for f in ("topk", "anchor_scale", "size_divisible", "assign_unmatched_gt")}
        kw.update({k: v for k, v in overrides.items() if k in kw and v is not None})
        return cls(**kw)


def anchor_grid(img_size: int, params: ATSSParams | None = None) -> tuple[Tensor, list[int]]:
    """The model's anchors at ``img_size`` (levels concatenated) and the anchors per level.

    The canvas is the ``ceil(img_size / size_divisible)``-multiple square of a training batch; P3-P5 have
    side / stride locations, P6 and P7 (3x3 stride-2 convs, padding 1) ceil(side / stride)."""
    params = params or ATSSParams.from_model()
    side = int(math.ceil(img_size / params.size_divisible) * params.size_divisible)
    sizes = [(int(math.ceil(side / s)),) * 2 for s in STRIDES]
    anchors = grid_anchors(sizes, STRIDES, [params.anchor_scale * s for s in STRIDES])
    return anchors, [h * w for h, w in sizes]


def letterbox_ratios(sizes: np.ndarray, img_size: int) -> Tensor:
    """Per image (ratio_w, ratio_h) [I, 2] float32 of torchvision's resize with min_size = max_size = img_size.

    ``sizes`` [I, 2] is (width, height); scale = min(img/short, img/long) = img/long, new side = floor(side x scale)
    (``interpolate(recompute_scale_factor=True)``), ratio = float32(new) / float32(old) as ``resize_boxes``."""
    wh = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    scale = [min(img_size / min(w, h), img_size / max(w, h)) for w, h in wh.tolist()]
    new = np.array([[math.floor(w * s), math.floor(h * s)] for (w, h), s in zip(wh.tolist(), scale, strict=True)],
                   dtype=np.int64).reshape(-1, 2)
    return torch.from_numpy(new).float() / torch.from_numpy(wh).float()


def letterbox_boxes(boxes: Any, sizes: np.ndarray, image: np.ndarray, img_size: int) -> Tensor:
    """Boxes [B, 4] (xyxy, original pixels of image ``image[b]`` of size ``sizes[image[b]]`` = (w, h)) at
    ``img_size``, as the model's transform resizes them."""
    b = torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4)
    r = letterbox_ratios(sizes, img_size)[torch.as_tensor(np.asarray(image, dtype=np.int64))]  # [B, 2]
    return b * torch.cat((r, r), dim=1)  # (x1*rw, y1*rh, x2*rw, y2*rh)


# ----------------------------------------------------------------------------------------------- data
@dataclass
class DatasetBoxes:
    """All boxes of a detection split, without pixels: ``sizes`` [I, 2] (width, height), ``boxes`` [B, 4] float32
    xyxy, ``labels`` [B], ``image`` [B] (index of each box's image), ``first`` [I + 1] (image i's boxes are
    ``first[i]:first[i + 1]``), ``names`` [I] (file names) and ``classes``."""

    sizes: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    image: np.ndarray
    first: np.ndarray
    names: list[str]
    classes: list[str]

    @property
    def num_boxes(self) -> int:
        return int(len(self.labels))


def dataset_boxes(ds: Any) -> DatasetBoxes | None:
    """The boxes and image sizes of a ``DetectionDataset`` from its annotations (no decoding); None for a dataset
    that has no boxes API (a defect layout)."""
    if not (hasattr(ds, "annotations") and hasattr(ds, "to_coco")):
        return None
    images = ds.to_coco()["images"]  # ids are dataset indices; width / height from the validation pass
    n = len(ds)
    sizes = np.zeros((n, 2), dtype=np.int64)
    names = [""] * n
    for im in images:
        sizes[im["id"]] = (im["width"], im["height"])
        names[im["id"]] = str(im.get("file_name", im["id"]))
    boxes, labels, counts = [], [], np.zeros(n, dtype=np.int64)
    for i in range(n):
        b, lab = ds.annotations(i)
        boxes.append(np.asarray(b, dtype=np.float32).reshape(-1, 4))
        labels.append(np.asarray(lab, dtype=np.int64).reshape(-1))
        counts[i] = len(labels[-1])
    first = np.concatenate(([0], np.cumsum(counts)))
    return DatasetBoxes(
        sizes=sizes,
        boxes=np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32),
        labels=np.concatenate(labels) if labels else np.zeros(0, np.int64),
        image=np.repeat(np.arange(n), counts),
        first=first,
        names=names,
        classes=list(getattr(ds, "classes", [])),
    )


# ----------------------------------------------------------------------------------------------- assignment
@dataclass
class AssignStats:
    """Per box at ``img_size``: ``level_counts`` [B, L] positives per pyramid level (P3..P7), ``boxes`` [B, 4] the
    letterboxed boxes; rows of images not run (a subset) are -1 in ``level_counts``."""

    img_size: int
    level_counts: np.ndarray
    boxes: np.ndarray

    @property
    def num_pos(self) -> np.ndarray:
        """Positive anchors per box [B] (-1: not run)."""
        return np.where(self.level_counts[:, 0] < 0, -1, self.level_counts.sum(1))


@torch.inference_mode()
def assign_boxes(data: DatasetBoxes, img_size: int, params: ATSSParams | None = None,
                 images: Sequence[int] | None = None, progress: bool = False) -> AssignStats:
    """Run the model's ATSS assignment (``atss_assign``, all of an image's boxes at once) on every image with
    boxes, or on ``images`` only."""
    params = params or ATSSParams.from_model()
    anchors, per_level = anchor_grid(img_size, params)
    level_of = torch.repeat_interleave(torch.arange(len(per_level)), torch.tensor(per_level))
    L = len(per_level)
    lb = letterbox_boxes(data.boxes, data.sizes, data.image, img_size)
    counts = np.full((data.num_boxes, L), -1, dtype=np.int64)
    first = data.first
    todo = range(len(data.sizes)) if images is None else sorted(set(int(i) for i in images))
    todo = [i for i in todo if first[i + 1] > first[i]]
    bar = None
    if progress:
        from vision.progress import progress_bar

        bar = progress_bar(len(todo), desc=f"ATSS assignment at {img_size}px", unit="img")
    for i in todo:
        a, b = int(first[i]), int(first[i + 1])
        assigned = atss_assign(anchors, per_level, lb[a:b], topk=params.topk,
                               assign_unmatched_gt=params.assign_unmatched_gt)
        pos = torch.nonzero(assigned >= 0).squeeze(1)
        key = assigned[pos] * L + level_of[pos]  # (gt, level) pairs
        counts[a:b] = torch.bincount(key, minlength=(b - a) * L).view(b - a, L).numpy()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return AssignStats(img_size=int(img_size), level_counts=counts, boxes=lb.numpy())


def holds_anchor_centre(boxes: np.ndarray, stride: int = STRIDES[0], margin: float = 0.01) -> np.ndarray:
    """Whether an anchor centre of the finest level (multiples of ``stride``; coarser levels' centres are among
    them) lies inside each box [B, 4] by more than ``margin``, the assigner's condition for a positive."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    inside = []
    for lo, hi in ((b[:, 0], b[:, 2]), (b[:, 1], b[:, 3])):
        k = np.floor((lo + margin) / stride) + 1  # the first centre beyond lo + margin
        inside.append(k * stride < hi - margin)
    return inside[0] & inside[1]


def zero_reasons(data: DatasetBoxes, stats: AssignStats, zero: np.ndarray, params: ATSSParams) -> list[str]:
    """Why each box of ``zero`` (indices) got no positive: ``small`` / ``thin`` when no anchor centre lies inside
    it (both sides / one side under the P3 stride), else ``overlap`` when the box alone gets one (another box of
    the image won its anchors), else ``threshold``."""
    if len(zero) == 0:
        return []
    anchors, per_level = anchor_grid(stats.img_size, params)
    holds = holds_anchor_centre(stats.boxes[zero])
    out = []
    with torch.inference_mode():
        for j, h in zip(zero.tolist(), holds.tolist(), strict=True):
            if not h:
                bw, bh = stats.boxes[j, 2] - stats.boxes[j, 0], stats.boxes[j, 3] - stats.boxes[j, 1]
                out.append("small" if max(bw, bh) < STRIDES[0] else "thin")
                continue
            alone = atss_assign(anchors, per_level, torch.from_numpy(stats.boxes[j:j + 1]), topk=params.topk)
            out.append("overlap" if bool((alone >= 0).any()) else "threshold")
    return out


@dataclass
class FixSuggestion:
    """What fixes the zero-positive boxes: ``tried`` = [{"img_size", "fixed", "of"}] on ``images`` affected
    images (a sample when ``sampled``); ``img_size`` the smallest sane size that gives all of them a positive,
    else ``slice`` (tile side in original pixels) when a larger upscale would, else neither."""

    tried: list[dict[str, int]]
    img_size: int | None
    slice: int | None
    images: int
    sampled: bool

    def line(self, img_size: int) -> str:
        """One sentence for the report."""
        if not self.tried:
            return ""
        of = self.tried[0]["of"]
        where = f" (estimated on {self.images} of the affected images)" if self.sampled else ""
        if self.img_size is not None:
            return f"--img-size {self.img_size} gives all {of:,} of them a positive anchor{where}."
        best = max(self.tried, key=lambda t: (t["fixed"], -t["img_size"]))
        text = ""
        sizes = sane_sizes(img_size)
        sane = [t for t in self.tried if t["img_size"] in sizes]
        if sane:
            top = max(sane, key=lambda t: (t["fixed"], -t["img_size"]))
            text = f"--img-size {top['img_size']} gives {top['fixed']:,} of {of:,} a positive anchor. "
        if self.slice is not None:
            factor = best["img_size"] / img_size
            return text + (f"Tiling the images (--slice {self.slice}: tiles of about {self.slice} px trained at "
                           f"--img-size {img_size}, x{factor:.3g} the scale) gives all of them one{where}.")
        factor = max(t["img_size"] for t in self.tried) / img_size
        return text + (f"No tried scale up to x{factor:.3g} gives all of them one{where}; "
                       "assign_unmatched_gt=True (ATSS#90's workaround) gives each its best candidate.")


def candidate_sizes(img_size: int, factors: Sequence[float], multiple: int = 32) -> list[int]:
    """``img_size x factor`` rounded up to ``multiple``, increasing, each larger than ``img_size``."""
    out = {max(multiple, int(math.ceil(img_size * f / multiple - 1e-9)) * multiple) for f in factors}
    return sorted(s for s in out if s > img_size)


def sane_sizes(img_size: int) -> list[int]:
    """The ``--img-size`` values a suggestion may name: :data:`SIZE_FACTORS` x img_size, up to
    :data:`MAX_SANE_IMG_SIZE`."""
    return [s for s in candidate_sizes(img_size, SIZE_FACTORS) if s <= MAX_SANE_IMG_SIZE]


def stride_factor(stats: AssignStats, boxes: np.ndarray, limit: float = MAX_STRIDE_FACTOR) -> list[float]:
    """The upscale that makes the shorter side of every box in ``boxes`` exceed the P3 stride (so an anchor centre
    must fall inside it), as a one-element list when it is at most ``limit``."""
    if len(boxes) == 0:
        return []
    b = stats.boxes[boxes]
    short = float(np.minimum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]).min())
    f = (STRIDES[0] + 0.5) / max(short, 1e-6)
    return [f] if 1.0 < f <= limit else []


def suggest_fix(data: DatasetBoxes, stats: AssignStats, params: ATSSParams | None = None,
                max_images: int = MAX_SUGGEST_IMAGES) -> FixSuggestion:
    """Re-run the assigner at larger sizes on the images of the zero-positive boxes (all their boxes, at most
    ``max_images`` images, evenly spread): the smallest ``--img-size`` of :data:`SIZE_FACTORS` (at most
    :data:`MAX_SANE_IMG_SIZE`) that gives every such box a positive, else the tile side of a ``--slice`` whose
    upscale (:data:`SLICE_FACTORS`, or the one that lifts the boxes' shorter side over the P3 stride) would."""
    params = params or ATSSParams.from_model()
    zero = np.nonzero(stats.num_pos == 0)[0]
    if len(zero) == 0:
        return FixSuggestion([], None, None, 0, False)
    imgs = np.unique(data.image[zero])
    sampled = len(imgs) > max_images
    if sampled:
        imgs = imgs[np.linspace(0, len(imgs) - 1, max_images).round().astype(np.int64)]
    boxes = zero[np.isin(data.image[zero], imgs)]
    factors = SIZE_FACTORS + SLICE_FACTORS + tuple(stride_factor(stats, boxes))
    sane = sane_sizes(stats.img_size)
    tried: list[dict[str, int]] = []
    for s in candidate_sizes(stats.img_size, factors):
        pos = assign_boxes(data, s, params, images=imgs.tolist()).num_pos[boxes]
        fixed = int((pos > 0).sum())
        tried.append({"img_size": s, "fixed": fixed, "of": int(len(boxes))})
        if fixed == len(boxes):
            if s in sane:
                return FixSuggestion(tried, s, None, len(imgs), sampled)
            long_side = float(np.median(data.sizes[imgs].max(1)))
            tile = int(round(long_side * stats.img_size / s))
            return FixSuggestion(tried, None, max(tile, 1), len(imgs), sampled)
    return FixSuggestion(tried, None, None, len(imgs), sampled)


# ----------------------------------------------------------------------------------------------- pictures
def png_data_uri(png: bytes) -> str:
    """A ``data:image/png;base64,...`` URI."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure_png(fig: Any) -> bytes:
    """A matplotlib figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_positives(num_pos: np.ndarray, level_pos: np.ndarray, img_size: int) -> bytes:
    """Two panels: the histogram of positives per box, and positives per pyramid level."""
    from vision.viz import new_figure

    fig = new_figure((9.0, 3.4))
    ax1, ax2 = fig.subplots(1, 2)
    top = int(num_pos.max()) if len(num_pos) else 0
    hist = np.bincount(num_pos, minlength=top + 1)
    colors = ["#d62728" if k == 0 else "#1f77b4" for k in range(len(hist))]
    from matplotlib.ticker import MaxNLocator

    ax1.bar(np.arange(len(hist)), hist, color=colors, width=0.85)
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set_xlabel("positive anchors per box")
    ax1.set_ylabel("boxes")
    ax1.set_title(f"Positives per box at {img_size}px (red: none)", fontsize=10)
    ax2.bar(list(LEVELS), level_pos, color="#2ca02c")
    ax2.set_xlabel("pyramid level (stride 8 .. 128)")
    ax2.set_ylabel("positive anchors")
    ax2.set_title("Positives per level", fontsize=10)
    return figure_png(fig)


def thumbnail(image: np.ndarray, box: np.ndarray, ratio: tuple[float, float], pos_centres: np.ndarray,
              label: str) -> bytes:
    """A THUMB_PX square crop around ``box`` (original pixels) with the box (red), the P3 anchor centres (grey
    dots; ``ratio`` = letterbox (rw, rh)) and the box's positive anchor centres (green, original pixels)."""
    from PIL import Image, ImageDraw

    from vision.viz import load_font

    h, w = image.shape[:2]
    x1, y1, x2, y2 = (float(v) for v in box)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    # context: 8 P3 strides at the training scale, or 3x the box, in original pixels
    half = max(4 * STRIDES[0] / min(ratio), 1.5 * max(x2 - x1, y2 - y1), 8.0)
    left, top = int(math.floor(cx - half)), int(math.floor(cy - half))
    side = int(math.ceil(2 * half))
    canvas = Image.new("RGB", (side, side), (96, 96, 96))
    src = Image.fromarray(image).crop((max(left, 0), max(top, 0), min(left + side, w), min(top + side, h)))
    canvas.paste(src, (max(left, 0) - left, max(top, 0) - top))
    k = THUMB_PX / side
    canvas = canvas.resize((THUMB_PX, THUMB_PX), Image.NEAREST if k >= 2 else Image.BILINEAR)
    draw = ImageDraw.Draw(canvas)
    step_x, step_y = STRIDES[0] / ratio[0], STRIDES[0] / ratio[1]  # P3 centres in original pixels
    for gy in np.arange(math.ceil(top / step_y), math.floor((top + side) / step_y) + 1):
        for gx in np.arange(math.ceil(left / step_x), math.floor((left + side) / step_x) + 1):
            px, py = (gx * step_x - left) * k, (gy * step_y - top) * k
            draw.ellipse((px - 1.5, py - 1.5, px + 1.5, py + 1.5), fill=(200, 200, 200), outline=(40, 40, 40))
    for px, py in pos_centres.reshape(-1, 2).tolist():
        px, py = (px - left) * k, (py - top) * k
        draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=(44, 160, 44), outline=(0, 0, 0))
    shown = ((x1 - left) * k, (y1 - top) * k, (x2 - left) * k, (y2 - top) * k)
    draw.rectangle((shown[0] - 2, shown[1] - 2, shown[2] + 2, shown[3] + 2), outline=(255, 255, 0), width=1)
    draw.rectangle(shown, outline=(214, 39, 40), width=2)
    draw.rectangle((0, 0, THUMB_PX - 1, 12), fill=(0, 0, 0))
    draw.text((2, 0), label[:28], fill=(255, 255, 255), font=load_font(10))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def positive_centres(data: DatasetBoxes, stats: AssignStats, j: int, params: ATSSParams) -> np.ndarray:
    """Centres (original pixels) of the positive anchors of box ``j`` (re-run on its image)."""
    i = int(data.image[j])
    a, b = int(data.first[i]), int(data.first[i + 1])
    anchors, per_level = anchor_grid(stats.img_size, params)
    with torch.inference_mode():
        assigned = atss_assign(anchors, per_level, torch.from_numpy(stats.boxes[a:b]), topk=params.topk,
                               assign_unmatched_gt=params.assign_unmatched_gt)
    sel = anchors[assigned == (j - a)]
    centres = ((sel[:, :2] + sel[:, 2:]) / 2).numpy()
    r = letterbox_ratios(data.sizes[i:i + 1], stats.img_size)[0].numpy()
    return centres / r


def worst_boxes(stats: AssignStats, n: int) -> np.ndarray:
    """Indices of the ``n`` worst boxes: fewest positives first, then the smallest (letterboxed area)."""
    pos = stats.num_pos
    ok = np.nonzero(pos >= 0)[0]
    area = (stats.boxes[ok, 2] - stats.boxes[ok, 0]) * (stats.boxes[ok, 3] - stats.boxes[ok, 1])
    order = np.lexsort((ok, area, pos[ok]))
    return ok[order[:n]]


# ----------------------------------------------------------------------------------------------- section
def _pct(a: int, b: int) -> str:
    return f"{100.0 * a / max(b, 1):.1f} %"


def summarise(data: DatasetBoxes, stats: AssignStats, params: ATSSParams, reasons: list[str]) -> dict[str, Any]:
    """The section's JSON figures (without the suggestion and the worst cases); ``reasons``: per zero-positive
    box (in index order), from :func:`zero_reasons`."""
    pos = stats.num_pos
    run = pos >= 0
    pos_run, levels = pos[run], stats.level_counts[run]
    zero = np.nonzero(pos == 0)[0]
    nonzero = pos_run > 0
    one_level = int(((levels > 0).sum(1) == 1)[nonzero].sum())
    n = int(run.sum())
    anchors, per_level = anchor_grid(stats.img_size, params)
    per_class = {}
    labels = data.labels[run]
    for c in np.unique(labels).tolist():
        name = data.classes[c] if 0 <= c < len(data.classes) else str(c)
        m = labels == c
        z = int((pos_run[m] == 0).sum())
        per_class[name] = {"boxes": int(m.sum()), "zero_positive": z, "share": z / max(int(m.sum()), 1)}
    hist = np.bincount(pos_run, minlength=1)
    return {
        "img_size": stats.img_size,
        "canvas": int(math.ceil(stats.img_size / params.size_divisible) * params.size_divisible),
        "topk": params.topk,
        "anchor_scale": params.anchor_scale,
        "assign_unmatched_gt": params.assign_unmatched_gt,
        "levels": {lv: {"stride": s, "anchor_size": params.anchor_scale * s, "anchors": k,
                        "positives": int(levels[:, li].sum()), "boxes_with_positives": int((levels[:, li] > 0).sum())}
                   for li, (lv, s, k) in enumerate(zip(LEVELS, STRIDES, per_level, strict=True))},
        "anchors": int(anchors.shape[0]),
        "images": int(len(data.sizes)),
        "images_with_boxes": int((np.diff(data.first) > 0).sum()),
        "boxes": n,
        "zero_positive": {
            "count": int(len(zero)),
            "share": len(zero) / max(n, 1),
            "by_reason": {r: reasons.count(r) for r in REASONS},
            "per_class": {k: v for k, v in per_class.items() if v["zero_positive"]},
        },
        "single_level": {"count": one_level, "share": one_level / max(int(nonzero.sum()), 1)},
        "positives_per_box": {
            "histogram": hist.tolist(),
            "mean": float(pos_run.mean()) if n else 0.0,
            "median": float(np.median(pos_run)) if n else 0.0,
            "max": int(pos_run.max()) if n else 0,
        },
        "per_class": per_class,
    }


def render_html(figures: dict[str, Any], plot_uri: str, thumbs: list[tuple[str, str]], suggestion: str) -> str:
    """The section's HTML fragment (pictures as data: URIs)."""
    f = figures
    z = f["zero_positive"]
    e = html.escape
    sizes = ", ".join(f"{v['anchor_size']:g}" for v in f["levels"].values())
    lines = [
        '<div class="atss-assignment">',
        f"<p>At <code>--img-size {f['img_size']}</code> (a {f['canvas']}&times;{f['canvas']} canvas, "
        f"{f['anchors']:,} anchors: one square anchor of {f['anchor_scale']:g}&times;stride per location on "
        f"P3&ndash;P7, {sizes} px; top-{f['topk']} candidates "
        f"per level), the project's ATSS assigner gives <b>{z['count']:,} of {f['boxes']:,} training boxes "
        f"({_pct(z['count'], f['boxes'])}) no positive anchor</b>: the detector never learns them (ATSS#90: "
        f"small or thin boxes). {f['single_level']['count']:,} boxes "
        f"({100 * f['single_level']['share']:.1f} % of those with positives) have all their positives on one level; a box gets "
        f"{f['positives_per_box']['mean']:.1f} positive anchors on average (median "
        f"{f['positives_per_box']['median']:g}).</p>",
    ]
    if z["count"]:
        why = ", ".join(f"{n:,} {e(REASONS[r])}" for r, n in z["by_reason"].items() if n)
        lines.append(f"<p>Why: {why}.</p>")
    if suggestion:
        lines.append(f'<p class="suggestion"><b>Fix:</b> {e(suggestion)}</p>')
    lines.append(f'<img alt="positive anchors per box and per level" src="{plot_uri}">')
    if z["per_class"]:
        lines.append("<table><tr><th>class</th><th>boxes</th><th>no positive</th><th>share</th></tr>")
        for name, v in sorted(z["per_class"].items(), key=lambda kv: -kv[1]["share"]):
            lines.append(f"<tr><td>{e(name)}</td><td>{v['boxes']:,}</td><td>{v['zero_positive']:,}</td>"
                         f"<td>{_pct(v['zero_positive'], v['boxes'])}</td></tr>")
        lines.append("</table>")
    if thumbs:
        lines.append("<p>The worst boxes (red; grey dots: P3 anchor centres at the training scale, green: the box's "
                     "positive anchor centres):</p>")
        lines.append('<div class="thumbs" style="display:flex;flex-wrap:wrap;gap:8px">')
        for uri, caption in thumbs:
            lines.append(f'<figure style="margin:0;width:{THUMB_PX}px"><img alt="{e(caption)}" src="{uri}" '
                         f'width="{THUMB_PX}" height="{THUMB_PX}"><figcaption style="font-size:11px">'
                         f"{e(caption)}</figcaption></figure>")
        lines.append("</div>")
    lines.append("<p><small>Boxes are letterboxed as the model's resize does (no augmentation); positives are "
                 "counted after anchors claimed by several boxes went to the higher IoU.</small></p>")
    lines.append("</div>")
    return "\n".join(lines)


def make_thumbnails(ds: Any, data: DatasetBoxes, stats: AssignStats, worst: np.ndarray,
                    reasons: dict[int, str], params: ATSSParams) -> tuple[list[tuple[str, str]], list[dict[str, Any]]]:
    """Thumbnails (data URI, caption) and JSON rows of the ``worst`` boxes; images that cannot be decoded are
    listed without a picture."""
    thumbs, rows = [], []
    pos = stats.num_pos
    for j in worst.tolist():
        i = int(data.image[j])
        lab = int(data.labels[j])
        name = data.classes[lab] if 0 <= lab < len(data.classes) else str(lab)
        lb = stats.boxes[j]
        w, h = float(lb[2] - lb[0]), float(lb[3] - lb[1])
        row = {"image": data.names[i], "class": name, "box": [round(float(v), 2) for v in data.boxes[j]],
               "size_at_img_size": [round(w, 2), round(h, 2)], "positives": int(pos[j]),
               "levels": {lv: int(c) for lv, c in zip(LEVELS, stats.level_counts[j], strict=True) if c},
               "reason": reasons.get(j)}
        rows.append(row)
        try:
            image = ds.load_image(i)
        except Exception as err:  # a bad image is named, not fatal to the report
            row["thumbnail_error"] = str(err)
            continue
        r = letterbox_ratios(data.sizes[i:i + 1], stats.img_size)[0].tolist()
        centres = positive_centres(data, stats, j, params) if pos[j] > 0 else np.zeros((0, 2))
        png = thumbnail(image, data.boxes[j], (r[0], r[1]), centres, f"{name} {w:.0f}x{h:.0f}px {int(pos[j])} pos")
        caption = f"{data.names[i]}: {name}, {w:.1f}x{h:.1f} px at {stats.img_size}, {int(pos[j])} positive"
        if row["reason"]:
            caption += f" ({REASONS[row['reason']]})"
        thumbs.append((png_data_uri(png), caption))
    return thumbs, rows


@register_section("atss_assignment", order=25)
def atss_assignment_section(ctx: ReportContext) -> ReportSection | None:
    """What ATSS will do with the training boxes at ``ctx.img_size``; None when there are no boxes.

    ``ctx.options`` may hold ``progress`` (bool), ``thumbnails`` (how many worst cases to show) and the model
    settings ``topk``, ``anchor_scale``, ``assign_unmatched_gt``."""
    ds = ctx.splits.get("train")
    data = dataset_boxes(ds) if ds is not None else None
    if data is None or data.num_boxes == 0:
        return None
    opts = ctx.options
    params = ATSSParams.from_model(**{k: opts.get(k) for k in ("topk", "anchor_scale", "assign_unmatched_gt")})
    stats = assign_boxes(data, ctx.img_size, params, progress=bool(opts.get("progress", True)))
    zero = np.nonzero(stats.num_pos == 0)[0]
    reasons_list = zero_reasons(data, stats, zero, params)
    figures = summarise(data, stats, params, reasons_list)
    reasons = dict(zip(zero.tolist(), reasons_list, strict=True))
    fix = suggest_fix(data, stats, params)
    suggestion = fix.line(ctx.img_size)
    figures["suggestion"] = {"text": suggestion, "img_size": fix.img_size, "slice": fix.slice, "tried": fix.tried,
                             "images": fix.images, "sampled": fix.sampled}
    worst = worst_boxes(stats, int(opts.get("thumbnails", NUM_THUMBNAILS)))
    thumbs, rows = make_thumbnails(ds, data, stats, worst, reasons, params)
    figures["worst"] = rows
    valid = stats.num_pos[stats.num_pos >= 0]
    level_pos = stats.level_counts[stats.num_pos >= 0].sum(0)
    plot_uri = png_data_uri(plot_positives(valid, level_pos, ctx.img_size))
    problems = []
    z, n = int(len(zero)), figures["boxes"]
    if z:
        line = (f"{z:,} of {n:,} training boxes ({_pct(z, n)}) get no positive anchor at --img-size {ctx.img_size} "
                f"(ATSS#90: small or thin boxes); the detector never learns them.")
        if suggestion:
            line += " " + suggestion
        problems.append(line)
    return ReportSection(title="What ATSS will do with these boxes", figures=figures,
                         html=render_html(figures, plot_uri, thumbs, suggestion), problems=problems)
