"""Pictures people look at: boxes on images, heatmap overlays, image grids, PR/ROC/histogram plots.

Plots use matplotlib's object API with the Agg canvas (no pyplot, no global backend switch), so
they work headless and in threads. Every ``save``/``plot`` writes atomically (temp file, then rename).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from vision.io import atomic_writer

# Fixed, distinct palette (tab10 followed by the darker half of tab20), RGB 0..255.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
)

ImageLike = Any  # PIL.Image | np.ndarray (HWC/HW) | torch.Tensor (CHW/HW)


def to_numpy(x: Any) -> np.ndarray:
    """Tensor / array / list -> numpy array (detached, on CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def to_pil(image: ImageLike) -> Image.Image:
    """Convert a PIL image, HWC/HW numpy array or CHW/HW tensor (float 0..1 or uint8) to an RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    is_tensor = hasattr(image, "detach")
    arr = to_numpy(image)
    if arr.ndim == 3 and is_tensor:
        arr = np.transpose(arr, (1, 2, 0))  # CHW -> HWC
    elif arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.transpose(arr, (1, 2, 0))  # CHW numpy array
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ValueError(f"cannot interpret array of shape {tuple(arr.shape)} as an image")
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        if arr.size and (np.nanmax(arr) > 1.0 + 1e-6 or np.nanmin(arr) < -1e-6) and np.nanmax(arr) <= 255:
            arr = arr / 255.0  # float array in 0..255
        arr = (np.clip(np.nan_to_num(arr), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    img = Image.fromarray(arr)
    return img.convert("RGB")


def class_color(label: int) -> tuple[int, int, int]:
    """The fixed palette colour for class ``label``."""
    return PALETTE[int(label) % len(PALETTE)]


def load_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def _text_color(bg: tuple[int, int, int]) -> tuple[int, int, int]:
    lum = 0.299 * bg[0] + 0.587 * bg[1] + 0.114 * bg[2]
    return (0, 0, 0) if lum > 150 else (255, 255, 255)


def draw_boxes(
    image: ImageLike,
    boxes: Any,
    labels: Any = None,
    scores: Any = None,
    class_names: Sequence[str] | None = None,
    color_by_class: bool = True,
    width: int = 2,
    font_size: int | None = None,
) -> Image.Image:
    """Draw xyxy ``boxes`` on a copy of ``image`` with "name 0.87" captions; one palette colour per class."""
    img = to_pil(image).copy()
    b = to_numpy(boxes).astype(np.float64).reshape(-1, 4) if boxes is not None else np.zeros((0, 4))
    n = len(b)
    lab = None if labels is None else to_numpy(labels).astype(np.int64).reshape(-1)
    sc = None if scores is None else to_numpy(scores).astype(np.float64).reshape(-1)
    for name, arr in (("labels", lab), ("scores", sc)):
        if arr is not None and len(arr) != n:
            raise ValueError(f"draw_boxes: {n} boxes but {len(arr)} {name}")
    if n == 0:
        return img
    font_size = font_size or max(10, round(min(img.size) / 40))
    font = load_font(font_size)
    draw = ImageDraw.Draw(img)
    for i in range(n):
        x0, y0, x1, y1 = (float(v) for v in b[i])
        x0, x1 = min(x0, x1), max(x0, x1)
        y0, y1 = min(y0, y1), max(y0, y1)
        if lab is not None and color_by_class:
            color = class_color(int(lab[i]))
        elif lab is None and color_by_class:
            color = class_color(i)
        else:
            color = PALETTE[0]
        draw.rectangle((x0, y0, x1, y1), outline=color, width=max(1, int(width)))
        parts: list[str] = []
        if lab is not None:
            k = int(lab[i])
            parts.append(class_names[k] if class_names is not None and 0 <= k < len(class_names) else str(k))
        if sc is not None:
            parts.append(f"{sc[i]:.2f}")
        if not parts:
            continue
        text = " ".join(parts)
        tx0, ty0, tx1, ty1 = draw.textbbox((0, 0), text, font=font)
        tw, th = tx1 - tx0 + 4, ty1 - ty0 + 4
        top = y0 - th if y0 - th >= 0 else y0  # above the box when it fits, else inside
        left = min(max(0.0, x0), max(0.0, img.width - tw))
        draw.rectangle((left, top, left + tw, top + th), fill=color)
        draw.text((left + 2 - tx0, top + 2 - ty0), text, fill=_text_color(color), font=font)
    return img


def _colormap(name: str):
    import matplotlib

    return matplotlib.colormaps[name]


def overlay_heatmap(image: ImageLike, heatmap: Any, alpha: float = 0.5, cmap: str = "jet") -> Image.Image:
    """Blend a colour-mapped ``heatmap`` (any size, resized to the image) over ``image``."""
    img = to_pil(image)
    h = to_numpy(heatmap).astype(np.float64).squeeze()
    if h.ndim != 2:
        raise ValueError(f"overlay_heatmap: heatmap must be 2-D (got shape {tuple(h.shape)})")
    h = np.nan_to_num(h, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(h.min()), float(h.max())
    if lo < 0.0 or hi > 1.0:  # normalise unless already in 0..1
        h = (h - lo) / (hi - lo) if hi > lo else np.zeros_like(h)
    if h.shape != (img.height, img.width):
        h = np.asarray(
            Image.fromarray(h.astype(np.float32), mode="F").resize(img.size, Image.Resampling.BILINEAR)
        ).astype(np.float64)
    colored = _colormap(cmap)(np.clip(h, 0.0, 1.0))[..., :3]
    base = np.asarray(img).astype(np.float64) / 255.0
    out = (1.0 - alpha) * base + alpha * colored
    return Image.fromarray((np.clip(out, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))


def image_grid(
    images: Sequence[ImageLike],
    nrow: int | None = None,
    pad: int = 2,
    titles: Sequence[str] | None = None,
    cell_size: tuple[int, int] | None = None,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Tile images (``nrow`` per row) into one picture; each is letterboxed into a ``cell_size`` (w, h) cell."""
    pils = [to_pil(im) for im in images]
    if not pils:
        raise ValueError("image_grid: no images given")
    if titles is not None and len(titles) != len(pils):
        raise ValueError(f"image_grid: {len(pils)} images but {len(titles)} titles")
    n = len(pils)
    ncol = nrow or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncol)
    cw, ch = cell_size or (max(p.width for p in pils), max(p.height for p in pils))
    font = None
    title_h = 0
    if titles is not None:
        font = load_font(max(10, round(min(cw, ch) / 12)))
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        title_h = max(probe.textbbox((0, 0), t or " ", font=font)[3] for t in titles) + 4
    W = ncol * cw + (ncol + 1) * pad
    H = nrows * (ch + title_h) + (nrows + 1) * pad
    grid = Image.new("RGB", (W, H), background)
    draw = ImageDraw.Draw(grid)
    for i, p in enumerate(pils):
        r, c = divmod(i, ncol)
        x = pad + c * (cw + pad)
        y = pad + r * (ch + title_h + pad)
        if titles is not None:
            draw.text((x + 2, y + 1), titles[i], fill=(0, 0, 0), font=font)
        fitted = p if p.size == (cw, ch) else ImageOps.contain(p, (cw, ch))
        grid.paste(fitted, (x + (cw - fitted.width) // 2, y + title_h + (ch - fitted.height) // 2))
    return grid


def save_image(img: ImageLike, path: str | os.PathLike) -> Path:
    """Save an image (any type ``to_pil`` takes) atomically (``vision.io.atomic_writer``: fsync, rename, umask)."""
    pil = to_pil(img)
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    with atomic_writer(path, "wb") as f:
        pil.save(f, format=fmt)
    return path


def new_figure(figsize: tuple[float, float] = (5.0, 4.0)):
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, dpi=100, layout="tight")


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_writer(path, "wb") as f:
        fig.savefig(f, format=path.suffix.lstrip(".").lower() or "png")
    return path


def plot_pr_curves(
    curves: Mapping[str, tuple[Any, Any]], path: str | os.PathLike, title: str = "Precision-recall"
) -> Path:
    """Plot one precision-recall curve per name (``{name: (recall, precision)}``); save a PNG."""
    fig = new_figure((6.0, 5.0))
    ax = fig.add_subplot()
    for i, (name, (rec, prec)) in enumerate(curves.items()):
        r = to_numpy(rec).astype(np.float64).reshape(-1)
        p = to_numpy(prec).astype(np.float64).reshape(-1)
        p = np.where(p < 0, np.nan, p)  # COCO marks "no ground truth" with -1
        valid = p[~np.isnan(p)]
        ap = float(valid.mean()) if valid.size else float("nan")
        ax.plot(r, p, color=np.array(class_color(i)) / 255.0, lw=1.5, label=f"{name} (AP {ap:.3f})")
    ax.set(xlabel="Recall", ylabel="Precision", title=title, xlim=(0, 1), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize="small", loc="lower left")
    return save_figure(fig, path)


def plot_roc_curve(
    fpr: Any, tpr: Any, path: str | os.PathLike, auroc: float | None = None, title: str = "ROC"
) -> Path:
    """Plot an ROC curve with the chance diagonal; save a PNG."""
    fig = new_figure((5.0, 5.0))
    ax = fig.add_subplot()
    label = "ROC" if auroc is None else f"AUROC {auroc:.4f}"
    ax.plot(to_numpy(fpr).reshape(-1), to_numpy(tpr).reshape(-1), color="tab:blue", lw=1.8, label=label)
    ax.plot([0, 1], [0, 1], ls="--", color="gray", lw=1.0, label="chance")
    ax.set(xlabel="False positive rate", ylabel="True positive rate", title=title, xlim=(0, 1), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return save_figure(fig, path)


def plot_score_histograms(
    scores_id: Any,
    scores_ood: Any,
    path: str | os.PathLike,
    bins: int = 50,
    labels: tuple[str, str] = ("ID", "OOD"),
    title: str = "Score distributions",
) -> Path:
    """Overlay normalised histograms of in-distribution and OOD scores on shared bins; save a PNG."""
    a = to_numpy(scores_id).astype(np.float64).reshape(-1)
    b = to_numpy(scores_ood).astype(np.float64).reshape(-1)
    both = np.concatenate([a, b])
    both = both[np.isfinite(both)]
    lo, hi = (float(both.min()), float(both.max())) if both.size else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, int(bins) + 1)
    fig = new_figure((6.0, 4.0))
    ax = fig.add_subplot()
    for vals, lab, col in ((a, labels[0], "tab:blue"), (b, labels[1], "tab:red")):
        vals = vals[np.isfinite(vals)]
        if vals.size:
            ax.hist(vals, bins=edges, density=True, alpha=0.5, color=col, label=f"{lab} (n={vals.size})")
    ax.set(xlabel="Score", ylabel="Density", title=title)
    ax.grid(alpha=0.3)
    if a.size or b.size:
        ax.legend()
    return save_figure(fig, path)


def plot_metric_curve(
    x: Any,
    y: Any,
    path: str | os.PathLike,
    xlabel: str = "x",
    ylabel: str = "y",
    yerr: Any = None,
    title: str | None = None,
) -> Path:
    """Plot y against x (with an optional +-yerr band), e.g. a metric over epochs or a swept parameter."""
    xs = to_numpy(x).astype(np.float64).reshape(-1)
    ys = to_numpy(y).astype(np.float64).reshape(-1)
    fig = new_figure((6.0, 4.0))
    ax = fig.add_subplot()
    ax.plot(xs, ys, marker="o", ms=3, color="tab:blue")
    if yerr is not None:
        e = to_numpy(yerr).astype(np.float64).reshape(-1)
        ax.fill_between(xs, ys - e, ys + e, color="tab:blue", alpha=0.2)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_confusion_matrix(
    matrix: Any,
    class_names: Sequence[str] | None,
    path: str | os.PathLike,
    normalize: bool = True,
    title: str | None = None,
) -> Path:
    """Draw a detection confusion matrix [C+1, C+1] (rows predicted, columns true, last = background); save a PNG.

    ``normalize`` divides each column by its total (the share of each true class predicted as each class); cells
    show those shares (or counts); blank cells are zero. Cell text is dropped above 30 classes.
    """
    m = to_numpy(matrix).astype(np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 2:
        raise ValueError(f"plot_confusion_matrix: need a square [C+1, C+1] matrix (got shape {tuple(m.shape)})")
    n = m.shape[0]
    names = [str(i) for i in range(n - 1)] if class_names is None else [str(c) for c in class_names]
    if len(names) != n - 1:
        raise ValueError(f"plot_confusion_matrix: {n - 1} classes in the matrix but {len(names)} class names")
    names = [*names, "background"]
    n_gt = int(round(m[:, :-1].sum()))
    if normalize:
        col = m.sum(0, keepdims=True)
        vals = np.divide(m, col, out=np.zeros_like(m), where=col > 0)
    else:
        vals = m
    side = float(np.clip(2.5 + 0.45 * n, 6.0, 24.0))
    fig = new_figure((side + 1.2, side))
    ax = fig.add_subplot()
    shown = np.where(vals > 0, vals, np.nan)  # zero cells stay white
    vmax = 1.0 if normalize else max(1.0, float(np.nanmax(vals)) if np.isfinite(shown).any() else 1.0)
    im = ax.imshow(shown, cmap=_colormap("Blues"), vmin=0.0, vmax=vmax, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, label="share of true class" if normalize else "count")
    cell_pt = side * 72 * 0.8 / n  # about the size of one cell, in points
    tick_fs = float(np.clip(0.5 * cell_pt, 5, 10))
    if n <= 12:
        ax.set_xticks(range(n), names, rotation=45, ha="right", rotation_mode="anchor", fontsize=tick_fs)
    else:
        ax.set_xticks(range(n), names, rotation=90, fontsize=tick_fs)
    ax.set_yticks(range(n), names, fontsize=tick_fs)
    ax.set_xlabel("True")
    ax.set_ylabel("Predicted")
    ax.set_xticks(np.arange(-0.5, n), minor=True)
    ax.set_yticks(np.arange(-0.5, n), minor=True)
    ax.grid(which="minor", color="0.85", lw=0.5)
    ax.tick_params(which="minor", length=0)
    if n <= 31:
        cell_fs = float(np.clip(0.3 * cell_pt, 6, 11))
        for r in range(n):
            for c in range(n):
                v = vals[r, c]
                if v <= 0:
                    continue
                text = (f"{v:.2f}" if v >= 0.005 else "<.01") if normalize else str(int(round(v)))
                dark = v / vmax > 0.55
                ax.text(c, r, text, ha="center", va="center", fontsize=cell_fs, color="white" if dark else "black")
    kind = "normalised per true class" if normalize else "counts"
    ax.set_title(title or f"Confusion matrix ({kind}; {n_gt} ground-truth boxes)")
    return save_figure(fig, path)


_CURVE_KINDS = {"f1": ("f1", "F1"), "p": ("precision", "Precision"), "r": ("recall", "Recall")}


def plot_confidence_curves(
    curves: Mapping[str, Any],
    path: str | os.PathLike,
    kind: str = "f1",
) -> Path:
    """Plot F1, precision or recall against confidence (``vision.metrics.confidence_curves`` output); save a PNG.

    One thin grey line per class (up to 20 classes), a thick blue one for all classes, labelled with its value at the
    best-F1 confidence (dotted line), e.g. "all classes 0.62 at 0.41".
    """
    if kind not in _CURVE_KINDS:
        raise ValueError(f"plot_confidence_curves: kind must be one of {sorted(_CURVE_KINDS)} (got {kind!r})")
    key, ylabel = _CURVE_KINDS[kind]
    x = to_numpy(curves["conf"]).astype(np.float64).reshape(-1)
    per_class = to_numpy(curves[key]).astype(np.float64).reshape(-1, len(x))
    y_all = to_numpy(curves[f"{key}_all"]).astype(np.float64).reshape(-1)
    best_conf = float(curves.get("best_conf", float("nan")))
    fig = new_figure((6.0, 4.5))
    ax = fig.add_subplot()
    shown = [k for k in range(len(per_class)) if np.isfinite(per_class[k]).any()]
    if len(shown) <= 20:
        for j, k in enumerate(shown):
            ax.plot(x, per_class[k], color="0.6", lw=0.8, label=f"per class ({len(shown)})" if j == 0 else None)
    if np.isfinite(y_all).any():
        if math.isfinite(best_conf):
            i = int(np.argmin(np.abs(x - best_conf)))
            label = f"all classes {y_all[i]:.2f} at {best_conf:.2f}" + ("" if kind == "f1" else " (best F1)")
            ax.axvline(best_conf, color="tab:blue", ls=":", lw=1.0)
        else:
            label = "all classes"
        ax.plot(x, y_all, color="tab:blue", lw=3.0, label=label)
        ax.legend(loc="best", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no ground truth", ha="center", va="center", transform=ax.transAxes, color="0.4")
    iou = curves.get("iou_thresh")
    where = f" (IoU {float(iou):.2f})" if iou is not None else ""
    ax.set(xlabel="Confidence", ylabel=ylabel, xlim=(0, 1), ylim=(0, 1.02), title=f"{ylabel}-confidence curve{where}")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
