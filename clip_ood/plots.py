"""Pictures of clip_ood results: OOD ROC on a log-FPR axis with the FPR95 point, retrieval top-5 examples.

Plots use ``vision.viz``'s Agg figures and atomic writers (temp file, rename, umask respected). Convention as in
:func:`clip_ood.metrics.ood_metrics`: higher score = more in-distribution, ID is the positive class, so
TPR = share of ID images kept and FPR = share of OOD images wrongly kept, at the same threshold.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from vision.viz import class_color, load_font, new_figure, save_figure, save_image, to_numpy

GREEN = (30, 150, 50)
RED = (210, 40, 40)


# ---------------------------------------------------------------------- OOD ROC, log-scale FPR
def fpr95_point(scores_id: Any, scores_ood: Any, tpr: float = 0.95) -> tuple[float, float, float]:
    """(FPR, TPR, threshold) of the operating point behind ``ood_metrics``' fpr95: the threshold keeps
    ceil(tpr * n_id) ID scores; TPR is the share of ID scores >= it (>= ``tpr``; more with ties)."""
    from clip_ood.metrics import as_numpy, fpr_at_tpr

    fpr, thr = fpr_at_tpr(scores_id, scores_ood, tpr)
    return fpr, float(np.mean(as_numpy(scores_id) >= thr)), thr


def roc_logfpr_data(scores_id: Any, scores_ood: Any) -> dict[str, Any]:
    """What one curve of :func:`plot_roc_logfpr` draws: ROC vertices (``fpr``, ``tpr``), ``auroc``, ``fpr95``,
    ``tpr95`` (the TPR of the FPR95 point), ``threshold95``, ``n_id``, ``n_ood``."""
    from clip_ood.metrics import ood_metrics, roc_points

    fpr, tpr = roc_points(scores_id, scores_ood)
    m = ood_metrics(scores_id, scores_ood)
    f95, t95, thr = fpr95_point(scores_id, scores_ood)
    return {"fpr": fpr, "tpr": tpr, "auroc": m["auroc"], "fpr95": f95, "tpr95": t95, "threshold95": thr,
            "n_id": int(np.size(to_numpy(scores_id))), "n_ood": int(np.size(to_numpy(scores_ood)))}


def fpr_floor(n_ood: int, lowest: float = 1e-4) -> float:
    """Left end of the log-FPR axis: the decade below 1 / (2 n_ood), at most 1e-2, at least ``lowest`` (1e-2 up
    to 49 OOD images, 1e-3 up to 499, 1e-4 from 500 on); FPR = 0 is drawn on this edge."""
    return float(min(1e-2, max(lowest, 10.0 ** math.floor(math.log10(0.5 / max(1, n_ood))))))


def plot_roc_logfpr(
    curves: Mapping[str, tuple[Any, Any]],
    path: str | os.PathLike,
    title: str = "OOD ROC (ID = positive)",
    lowest_fpr: float = 1e-4,
) -> Path:
    """ROC per name (``{name: (scores_id, scores_ood)}``) with FPR on a log axis, each curve's FPR95 point
    marked and AUROC / FPR95 in the legend; save a PNG. FPR = 0 is drawn on the axis' left edge."""
    data = {name: roc_logfpr_data(sid, sood) for name, (sid, sood) in curves.items()}
    floor = min((fpr_floor(d["n_ood"], lowest_fpr) for d in data.values()), default=1e-4)
    fig = new_figure((6.4, 4.8 + 0.2 * len(data)))  # the legend sits below the axes, one line per curve
    ax = fig.add_subplot()
    ax.axhline(0.95, ls="--", lw=0.9, color="0.45", zorder=1)
    ax.text(floor * 1.15, 0.955, "TPR 95%", fontsize=8, color="0.35", va="bottom")
    xs = np.logspace(math.log10(floor), 0, 200)
    ax.plot(xs, xs, ls=":", lw=1.0, color="gray", label="chance", zorder=1)
    for i, (name, d) in enumerate(data.items()):
        col = np.array(class_color(i)) / 255.0
        ax.plot(np.maximum(d["fpr"], floor), d["tpr"], color=col, lw=1.8, zorder=2,
                label=f"{name}: AUROC {100 * d['auroc']:.2f}   FPR95 {100 * d['fpr95']:.2f}%  (n_ood={d['n_ood']})")
        # markers shrink curve by curve, so points that coincide stay visible as rings
        ax.plot([max(d["fpr95"], floor)], [d["tpr95"]], marker="o", ms=max(5.0, 9.5 - 1.2 * i), mfc=col,
                mec="black", mew=1.0, ls="none", zorder=3 + i)
    ax.plot([], [], marker="o", ms=7, mfc="white", mec="black", ls="none",
            label="FPR95 point: FPR where TPR first reaches 95%")
    ax.set_xscale("log")
    ax.set(xlim=(floor, 1.0), ylim=(0.0, 1.02), title=title, ylabel="True positive rate (ID kept)",
           xlabel=f"False positive rate (OOD kept as ID), log scale; FPR = 0 drawn at {floor:.0e}".replace("e-0", "e-"))
    ax.grid(alpha=0.3, which="major")
    ax.grid(alpha=0.12, which="minor")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize="small", frameon=False)
    return save_figure(fig, path)


# ---------------------------------------------------------------------- retrieval: top-K examples
def pick_queries(n_total: int, n: int) -> list[int]:
    """``n`` indices spread evenly over ``range(n_total)`` (all of them if n >= n_total)."""
    if n <= 0 or n_total <= 0:
        return []
    if n >= n_total:
        return list(range(n_total))
    return sorted({int(round(v)) for v in np.linspace(0, n_total - 1, n)})


def _thumb(path: str, size: int) -> Image.Image:
    from vision.io import open_image

    try:
        im = open_image(path, "RGB")
    except Exception:  # an unreadable file still gets its cell (grey, crossed)
        im = Image.new("RGB", (size, size), (200, 200, 200))
        d = ImageDraw.Draw(im)
        d.line((0, 0, size, size), fill=(120, 120, 120), width=2)
        d.line((0, size, size, 0), fill=(120, 120, 120), width=2)
        return im
    small = max(im.size) < size // 2  # tiny images: keep the pixels sharp
    im = ImageOps.contain(im, (size, size), Image.Resampling.NEAREST if small else Image.Resampling.LANCZOS)
    cell = Image.new("RGB", (size, size), (255, 255, 255))
    cell.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    return cell


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels, at most ``max_lines`` (a cut line or word ends in '...')."""

    def fits(t: str) -> bool:
        return draw.textlength(t, font=font) <= width

    def cut(t: str) -> str:
        while t and not fits(t + "..."):
            t = t[:-1]
        return t.rstrip() + "..."

    lines: list[str] = []
    cur = ""
    for w in text.split():
        cand = f"{cur} {w}" if cur else w
        if fits(cand):
            cur = cand
            continue
        if cur:
            lines.append(cur)
        cur = w if fits(w) else cut(w)
    if cur:
        lines.append(cur)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = cut(lines[-1])
    return lines or [""]


_PAD, _FRAME = 8, 4


def grid_layout(n_img: int, n_txt: int, n: int, k: int, thumb: int) -> dict[str, Any]:
    """Fonts, row heights, picked queries and the canvas size of :func:`retrieval_examples`."""
    k = max(1, min(k, n_img, n_txt))
    fonts = {"head": load_font(18), "cap": load_font(15), "small": load_font(12)}
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    h = {name: probe.textbbox((0, 0), "Ag", font=f)[3] for name, f in fonts.items()}
    L = {"k": k, "fonts": fonts, "cap_w": 2 * thumb + 40, "cell": thumb + 2 * _FRAME,
         "line_cap": h["cap"] + 4, "line_small": h["small"] + 3, "head_h": 2 * (h["head"] + 6) + _PAD,
         "q_txt": pick_queries(n_txt, n), "q_img": pick_queries(n_img, n)}
    L["row_t2i"] = L["cell"] + 4 * L["line_small"] + 2 * _PAD  # frame, rank line, 3 caption lines
    L["row_i2t"] = max(L["cell"], (k + 1) * L["line_cap"]) + 2 * _PAD  # k captions + where the true one is
    L["W"] = _PAD + L["cap_w"] + _PAD + k * (L["cell"] + _PAD)
    L["H"] = (L["head_h"] + len(L["q_txt"]) * L["row_t2i"]
              + (L["head_h"] + len(L["q_img"]) * L["row_i2t"] if L["q_img"] else 0) + _PAD)
    return L


def retrieval_examples_size(n_img: int, n_txt: int, n: int = 6, k: int = 5, thumb: int = 128) -> tuple[int, int]:
    """(width, height) of the :func:`retrieval_examples` picture for these sizes."""
    L = grid_layout(n_img, n_txt, n, k, thumb)
    return L["W"], L["H"]


def _mark(d: ImageDraw.ImageDraw, x: int, y: int, size: int, ok: bool) -> None:
    """A drawn check mark (green) or cross (red) in a ``size`` box at (x, y) (no font glyphs needed)."""
    if ok:
        d.line((x + 1, y + size * 0.55, x + size * 0.4, y + size - 1, x + size - 1, y + 1), fill=GREEN, width=3)
    else:
        d.line((x + 2, y + 2, x + size - 2, y + size - 2), fill=RED, width=3)
        d.line((x + 2, y + size - 2, x + size - 2, y + 2), fill=RED, width=3)


def retrieval_examples(
    sim: Any,
    positives: Any,
    texts: Sequence[str],
    image_paths: Sequence[str],
    image_captions: Sequence[str] | None = None,
    n: int = 6,
    k: int = 5,
    thumb: int = 128,
    title: str | None = None,
) -> Image.Image:
    """A picture of retrieval results for ``sim`` [N_img, N_txt] and bool ``positives`` of the same shape.

    Text->image: ``n`` captions (spread over ``texts``), each with its top-``k`` images in a row, framed green
    when the image matches the caption, red when not, with rank, similarity and the image's own caption.
    Image->text: ``n`` images, each with its top-``k`` captions as lines (green check = correct, red cross =
    wrong) and, when missed, the rank of its first correct caption. Size: :func:`retrieval_examples_size`.
    """
    s = to_numpy(sim).astype(np.float64)
    gt = to_numpy(positives).astype(bool)
    if s.ndim != 2 or gt.shape != s.shape or len(texts) != s.shape[1] or len(image_paths) != s.shape[0]:
        raise ValueError(f"retrieval_examples: sim {s.shape}, positives {gt.shape}, {len(texts)} texts and "
                         f"{len(image_paths)} images do not agree")
    n_img, n_txt = s.shape
    L = grid_layout(n_img, n_txt, n, k, thumb)
    k, cell, cap_w, pad = L["k"], L["cell"], L["cap_w"], _PAD
    f_head, f_cap, f_small = L["fonts"]["head"], L["fonts"]["cap"], L["fonts"]["small"]
    line_cap, line_small, W = L["line_cap"], L["line_small"], L["W"]
    canvas = Image.new("RGB", (W, L["H"]), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    grey, dark = (90, 90, 90), (60, 60, 60)

    def header(y: int, text: str, legend: str) -> int:
        d.text((pad, y + 4), (f"{title}:  " if title else "") + text, fill=(0, 0, 0), font=f_head)
        d.text((pad, y + 4 + L["head_h"] // 2 - 2), legend, fill=grey, font=f_small)
        d.line((pad, y + L["head_h"] - 3, W - pad, y + L["head_h"] - 3), fill=(160, 160, 160), width=1)
        return y + L["head_h"]

    def first_hit(ranked: np.ndarray, hits: np.ndarray) -> int | None:
        r = np.flatnonzero(hits[ranked])
        return int(r[0]) if r.size else None

    y = header(0, f"text -> image, top-{k} of {n_img} images",
               "green frame = image matches the caption, red = it does not;  #rank  cosine similarity")
    for t in L["q_txt"]:
        ranked = np.argsort(-s[:, t], kind="stable")
        n_pos, hit = int(gt[:, t].sum()), first_hit(ranked, gt[:, t])
        lines = _wrap(d, f'"{texts[t]}"', f_cap, cap_w - 4, 4)
        for j, line in enumerate(lines):
            d.text((pad, y + pad + j * line_cap), line, fill=(0, 0, 0), font=f_cap)
        note = f"{n_pos} matching image{'s' if n_pos != 1 else ''}" + (
            f", first at rank {hit + 1}" if hit is not None else "")
        d.text((pad, y + pad + len(lines) * line_cap + 4), note, fill=grey, font=f_small)
        for r, i in enumerate(ranked[:k]):
            x = pad + cap_w + pad + r * (cell + pad)
            ok = bool(gt[i, t])
            col = GREEN if ok else RED
            d.rectangle((x, y + pad, x + cell - 1, y + pad + cell - 1), fill=col)
            canvas.paste(_thumb(image_paths[i], thumb), (x + _FRAME, y + pad + _FRAME))
            ty = y + pad + cell + 2
            d.text((x, ty), f"#{r + 1}  {s[i, t]:.3f}  {'correct' if ok else 'wrong'}", fill=col, font=f_small)
            if image_captions is not None:
                for j, line in enumerate(_wrap(d, image_captions[i], f_small, cell, 3)):
                    d.text((x, ty + (j + 1) * line_small), line, fill=dark, font=f_small)
        y += L["row_t2i"]
        d.line((pad, y - 2, W - pad, y - 2), fill=(225, 225, 225), width=1)
    if L["q_img"]:
        y = header(y, f"image -> text, top-{k} of {n_txt} captions",
                   "green check = caption matches the image, red cross = it does not;  rank  cosine similarity")
        mark = line_cap - 6
        x_rank, x_mark = pad + cell + 2 * pad, pad + cell + 2 * pad + 80
        x_text = x_mark + mark + 10
        for i in L["q_img"]:
            ranked = np.argsort(-s[i], kind="stable")
            d.rectangle((pad, y + pad, pad + cell - 1, y + pad + cell - 1), fill=(150, 150, 150))
            canvas.paste(_thumb(image_paths[i], thumb), (pad + _FRAME, y + pad + _FRAME))
            for r, t in enumerate(ranked[:k]):
                ok = bool(gt[i, t])
                ly = y + pad + r * line_cap
                d.text((x_rank, ly), f"{r + 1}.  {s[i, t]:.3f}", fill=dark, font=f_cap)
                _mark(d, x_mark, ly + 2, mark, ok)
                line = _wrap(d, texts[t], f_cap, W - x_text - pad, 1)[0]
                d.text((x_text, ly), line, fill=GREEN if ok else RED, font=f_cap)
            hit = first_hit(ranked, gt[i])
            if hit is not None and hit >= k:
                t = int(ranked[hit])
                note = _wrap(d, f'correct caption at rank {hit + 1}: "{texts[t]}"', f_small, W - x_rank - pad, 1)[0]
                d.text((x_rank, y + pad + k * line_cap + 2), note, fill=grey, font=f_small)
            y += L["row_i2t"]
            d.line((pad, y - 2, W - pad, y - 2), fill=(225, 225, 225), width=1)
    return canvas


def save_retrieval_examples(path: str | os.PathLike, *args: Any, **kwargs: Any) -> Path:
    """:func:`retrieval_examples` written atomically to ``path`` (format from the suffix, e.g. .jpg)."""
    return save_image(retrieval_examples(*args, **kwargs), path)

