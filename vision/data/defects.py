"""A DAGM-style surface-defect sample set: textured grey images, most defect-free, some with synthetic defects.

Textures are real (scikit-image's bundled brick, grass and gravel photos) or procedural (multi-scale noise,
woven fabric, brushed metal, wood grain); defects are scratches, spots, cracks and stains, each with a
pixel mask. A share of the defective training images is marked image-level only (mixed supervision).
Everything is generated offline and is deterministic for a seed; sample i does not depend on the set size.

Layout written (the generic folder layout of ``negvision defect``)::

    OUT/train/images/train_0000.png   OUT/train/masks/train_0000.png (defective images only)
    OUT/train/labels.csv              image,label,segmented,texture,defect
    OUT/test/...                      OUT/info.json
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from vision.io import write_bytes_atomic, write_text_atomic

__all__ = ["DEFECT_TYPES", "TEXTURES", "make_defects", "render_defect_sample"]

REAL_TEXTURES = ("brick", "grass", "gravel")
PROCEDURAL_TEXTURES = ("noise", "fabric", "brushed", "wood")
TEXTURES = REAL_TEXTURES + PROCEDURAL_TEXTURES
DEFECT_TYPES = ("scratch", "spot", "crack", "stain")
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


# ----------------------------------------------------------------------------------------------- textures


@cache
def _real_texture(name: str) -> np.ndarray:
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    if img.ndim == 3:
        img = img[..., :3].mean(axis=2)
    return img.astype(np.float32) / 255.0


def _smooth_noise(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """Gaussian noise low-passed at ``scale`` pixels, zero mean, unit std."""
    from scipy.ndimage import gaussian_filter

    n = rng.standard_normal((size, size)).astype(np.float32)
    a = gaussian_filter(n, sigma=max(0.5, scale), mode="wrap")
    return (a - a.mean()) / (a.std() + 1e-6)


def _resize(a: np.ndarray, w: int, h: int) -> np.ndarray:
    return np.asarray(Image.fromarray(a.astype(np.float32)).resize((w, h), Image.Resampling.BILINEAR))


def _texture(rng: np.random.Generator, name: str, size: int) -> np.ndarray:
    """A [size, size] float texture in [0, 1]."""
    if name in REAL_TEXTURES:
        src = _real_texture(name)
        side = int(min(src.shape) * rng.uniform(0.3, 1.0))
        y, x = (int(rng.integers(0, s - side + 1)) for s in src.shape)
        crop = _resize(src[y : y + side, x : x + side], size, size)
        crop = np.rot90(crop, int(rng.integers(4)))
        return np.clip(crop if rng.random() < 0.5 else crop[:, ::-1], 0, 1)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if name == "noise":
        t = sum(_smooth_noise(rng, size, size * s) * w for s, w in ((0.01, 0.5), (0.04, 0.35), (0.12, 0.25)))
        return np.clip(0.5 + 0.12 * t, 0, 1)
    if name == "fabric":
        period = rng.uniform(6, 14) * size / 128
        ang = rng.uniform(0, math.pi)
        u = (np.cos(ang) * xx + np.sin(ang) * yy) * size / period * 2 * math.pi
        v = (-np.sin(ang) * xx + np.cos(ang) * yy) * size / period * 2 * math.pi
        weave = np.sin(u) * np.sign(np.sin(v / 2)) + np.sin(v) * np.sign(np.cos(u / 2))
        t = 0.5 + 0.1 * weave + 0.04 * _smooth_noise(rng, size, 1.0)
        return np.clip(t, 0, 1)
    if name == "brushed":
        n = rng.standard_normal((size, size)).astype(np.float32)
        k = max(3, size // 6)
        n = np.cumsum(n, axis=1)
        n = n - np.concatenate([np.zeros((size, k), np.float32), n[:, :-k]], axis=1)  # running mean along rows
        n = (n - n.mean()) / (n.std() + 1e-6)
        t = 0.5 + 0.08 * n + 0.05 * _smooth_noise(rng, size, size * 0.1)
        if rng.random() < 0.5:
            t = t.T
        return np.clip(t, 0, 1)
    # wood: rings around an off-image centre, distorted by smooth noise
    cx, cy = rng.uniform(-1.0, 2.0, size=2)
    r = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) * rng.uniform(15, 30)
    r = r + 0.8 * _smooth_noise(rng, size, size * 0.08)
    t = 0.5 + 0.12 * np.sin(2 * math.pi * r) + 0.03 * _smooth_noise(rng, size, 1.0)
    return np.clip(t, 0, 1)


# ----------------------------------------------------------------------------------------------- defects


def _canvas(size: int, ss: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("L", (size * ss, size * ss), 0)
    return img, ImageDraw.Draw(img)


def _finish(img: Image.Image, size: int, blur: float = 0.0) -> np.ndarray:
    if blur > 0:
        img = img.filter(ImageFilter.GaussianBlur(radius=blur))
    return np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0


def _defect_alpha(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """Opacity map [size, size] in [0, 1] of one defect (the mask is alpha > 0.5)."""
    ss = 4  # supersampling for smooth edges
    S = size * ss
    img, draw = _canvas(size, ss)
    margin = 0.12 * S
    cx, cy = rng.uniform(margin, S - margin, size=2)
    if kind == "scratch":
        length = rng.uniform(0.25, 0.6) * S
        ang = rng.uniform(0, math.pi)
        dx, dy = math.cos(ang) * length / 2, math.sin(ang) * length / 2
        bend = rng.normal(0, 0.15) * length
        pts = []
        for t in np.linspace(0, 1, 40):  # quadratic Bezier with a bent middle
            mx, my = cx - math.sin(ang) * bend, cy + math.cos(ang) * bend
            x = (1 - t) ** 2 * (cx - dx) + 2 * (1 - t) * t * mx + t**2 * (cx + dx)
            y = (1 - t) ** 2 * (cy - dy) + 2 * (1 - t) * t * my + t**2 * (cy + dy)
            pts.append((x, y))
        width = max(ss * 1.5, rng.uniform(0.012, 0.025) * S)
        draw.line(pts, fill=255, width=int(round(width)), joint="curve")
        return _finish(img, size)
    if kind == "spot":
        rx, ry = rng.uniform(0.03, 0.08, size=2) * S
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
        return _finish(img, size, blur=ss)
    if kind == "crack":
        width = int(round(max(ss * 1.5, 0.012 * S)))
        stack = [(cx, cy, rng.uniform(0, 2 * math.pi), 0)]
        step = 0.02 * S
        n_segments = 0
        while stack and n_segments < 6:
            x, y, ang, depth = stack.pop()
            pts = [(x, y)]
            for _ in range(int(rng.integers(8, 18))):
                ang += rng.normal(0, 0.35)
                x = float(np.clip(x + math.cos(ang) * step, 0, S - 1))
                y = float(np.clip(y + math.sin(ang) * step, 0, S - 1))
                pts.append((x, y))
                if depth < 2 and rng.random() < 0.08:
                    stack.append((x, y, ang + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2), depth + 1))
            draw.line(pts, fill=255, width=max(ss, width - depth * ss), joint="curve")
            n_segments += 1
        return _finish(img, size)
    # stain: a soft irregular blob (union of a few ellipses), low contrast
    r0 = rng.uniform(0.06, 0.14) * S
    for _ in range(int(rng.integers(3, 6))):
        ox, oy = rng.normal(0, 0.5 * r0, size=2)
        rx, ry = rng.uniform(0.5, 1.0, size=2) * r0
        draw.ellipse([cx + ox - rx, cy + oy - ry, cx + ox + rx, cy + oy + ry], fill=255)
    return _finish(img, size, blur=0.25 * r0)


def render_defect_sample(
    rng: np.random.Generator, size: int, defective: bool, texture: str | None = None, defect: str | None = None
) -> tuple[np.ndarray, np.ndarray, str, str]:
    """(uint8 image [size, size], bool mask, texture name, defect name or "") of one sample."""
    texture = texture or TEXTURES[int(rng.integers(len(TEXTURES)))]
    base = _texture(rng, texture, size)
    if not defective:
        return (np.clip(base, 0, 1) * 255 + 0.5).astype(np.uint8), np.zeros((size, size), bool), texture, ""
    defect = defect or DEFECT_TYPES[int(rng.integers(len(DEFECT_TYPES)))]
    for _ in range(20):
        alpha = _defect_alpha(rng, defect, size)
        mask = alpha > 0.5
        if mask.sum() >= 4:
            break
    local_std = float(base.std()) + 0.03
    contrast = {"scratch": 2.5, "spot": 2.2, "crack": 2.8, "stain": 1.4}[defect] * local_std
    sign = -1.0 if defect == "crack" or rng.random() < 0.5 else 1.0
    if defect == "stain":  # stains shift the local mean and flatten the texture a little
        img = base * (1 - 0.4 * alpha) + alpha * 0.4 * base.mean() + sign * contrast * alpha
    else:
        img = base + sign * contrast * alpha
    img = np.clip(img, 0, 1)
    return (img * 255 + 0.5).astype(np.uint8), mask, texture, defect


# ----------------------------------------------------------------------------------------------- writing


def _write_png(arr: np.ndarray, path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())


def _write_text(path: Path, text: str) -> None:
    write_text_atomic(path, text)


def make_defects(
    out_dir: str | os.PathLike[str],
    n_train: int = 200,
    n_test: int = 100,
    img_size: int = 128,
    seed: int = 0,
    defect_fraction: float = 0.3,
    image_level_fraction: float = 0.3,
    textures: Sequence[str] | None = None,
    defects: Sequence[str] | None = None,
) -> Path:
    """Write a DAGM-style defect data set (train + test) to ``out_dir``; returns ``out_dir``.

    Args:
        out_dir: output folder (created; existing files of the same names are replaced).
        n_train: number of training images.
        n_test: number of test images.
        img_size: side of the square grey images in pixels (a multiple of 8, at least 32).
        seed: random seed; the same seed gives the same images.
        defect_fraction: share of images with a defect (0..1).
        image_level_fraction: share of defective training images marked image-level only
            (``segmented=0`` in labels.csv; their masks are still written, for evaluation).
        textures: texture names to draw from (default: all of ``TEXTURES``); one texture and one defect
            type give a single DAGM-like class.
        defects: defect types to draw from (default: all of ``DEFECT_TYPES``).
    """
    if n_train < 0 or n_test < 0:
        raise ValueError(f"n_train and n_test must be >= 0, got {n_train}, {n_test}")
    if img_size < 32 or img_size % 8:
        raise ValueError(f"img_size must be a multiple of 8 and >= 32, got {img_size}")
    if not 0.0 <= defect_fraction <= 1.0:
        raise ValueError(f"defect_fraction must be in [0, 1], got {defect_fraction}")
    if not 0.0 <= image_level_fraction <= 1.0:
        raise ValueError(f"image_level_fraction must be in [0, 1], got {image_level_fraction}")
    tex = tuple(textures) if textures else TEXTURES
    dts = tuple(defects) if defects else DEFECT_TYPES
    for name, allowed, what in ((tex, TEXTURES, "texture"), (dts, DEFECT_TYPES, "defect type")):
        bad = [t for t in name if t not in allowed]
        if bad:
            raise ValueError(f"unknown {what}(s) {bad}; choose from {', '.join(allowed)}")
    out = Path(out_dir)
    info: dict = {"img_size": img_size, "seed": seed, "defect_fraction": defect_fraction,
                  "image_level_fraction": image_level_fraction, "textures": list(tex), "defects": list(dts),
                  "splits": {}}
    for stream, (split, n) in enumerate((("train", n_train), ("test", n_test))):
        img_dir, mask_dir = out / split / "images", out / split / "masks"
        img_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        rows = []
        n_pos = n_weak = 0
        for i in range(n):
            # low-discrepancy choice of the defective images: every prefix has about the right share
            defective = ((i * _GOLDEN) % 1.0) < defect_fraction
            rng = np.random.default_rng([seed, stream, i])
            texture = tex[int(rng.integers(len(tex)))]
            defect = dts[int(rng.integers(len(dts)))]
            img, mask, texture, defect = render_defect_sample(rng, img_size, defective, texture, defect)
            name = f"{split}_{i:04d}.png"
            _write_png(img, img_dir / name)
            segmented = 1
            if defective:
                _write_png(mask.astype(np.uint8) * 255, mask_dir / name)
                n_pos += 1
                if split == "train" and ((i * _GOLDEN * 7.0) % 1.0) < image_level_fraction:
                    segmented = 0
                    n_weak += 1
            else:
                (mask_dir / name).unlink(missing_ok=True)
            rows.append([name, int(defective), segmented, texture, defect])
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["image", "label", "segmented", "texture", "defect"])
        w.writerows(rows)
        _write_text(out / split / "labels.csv", buf.getvalue())
        info["splits"][split] = {"images": n, "defective": n_pos, "image_level_only": n_weak}
    _write_text(out / "info.json", json.dumps(info, indent=2) + "\n")
    return out
