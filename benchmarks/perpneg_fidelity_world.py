"""The generated world of benchmarks/perpneg_flow_fidelity.py: coloured handwritten digits on patterned grey backgrounds
with captions ("a red 7 on stripes", parts left out at random), a word-level text encoder and a three-head classifier.

Everything is rendered on the fly from scikit-learn's 1,797 8x8 digits (``load_digits``, offline), upscaled; every
draw comes from a numpy Generator the caller seeds, so a (seed, step) pair always renders the same batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

COLOURS: dict[str, tuple[float, float, float]] = {  # RGB in [0, 1]; each sample jitters them by +-JITTER
    "red": (0.95, 0.12, 0.10),
    "green": (0.15, 0.80, 0.20),
    "blue": (0.20, 0.35, 1.00),
    "yellow": (0.95, 0.90, 0.15),
}
BACKGROUNDS = ("stripes", "dots", "checks", "plain")
DIGITS = tuple(str(d) for d in range(10))
PAD = "<pad>"
VOCAB = (PAD, "a", "on", *DIGITS, *COLOURS, *BACKGROUNDS)
MAX_WORDS = 5  # "a red 7 on stripes"


@dataclass
class WorldConfig:
    """How the world is drawn and captioned (saved next to the weights)."""

    size: int = 16  # image side (pixels)
    glyph: int = 12  # digit side after resizing the 8x8 glyph (bilinear)
    shift: int = 1  # max random offset of the digit from the centre (pixels)
    colour_jitter: float = 0.08
    p_uncond: float = 0.10  # empty caption "" (classifier-free guidance)
    p_keep: float = 0.70  # otherwise each of colour / digit / background is named with this probability
    held_every: int = 5  # every 5th glyph is held out (for the classifier's accuracy); the rest train
    colours: list[str] = field(default_factory=lambda: list(COLOURS))
    backgrounds: list[str] = field(default_factory=lambda: list(BACKGROUNDS))

    def to_dict(self) -> dict:
        return asdict(self)


def caption(digit: int | None, colour: str | None, background: str | None) -> str:
    """The caption naming the given parts, e.g. (7, "red", "stripes") -> "a red 7 on stripes", (None, "red", None) -> "red"."""
    words = []
    if digit is not None:
        words.append("a")
    if colour is not None:
        words.append(colour)
    if digit is not None:
        words.append(str(digit))
    if background is not None:
        words += ["on", background]
    return " ".join(words)


def load_glyphs(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits resized to ``size`` x ``size`` as float alpha in [0, 1] [N, size, size], labels [N]."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images * (255.0 / 16.0)).round().astype(np.uint8)  # 0..16 -> 0..255
    out = np.stack([np.asarray(Image.fromarray(g).resize((size, size), Image.BILINEAR)) for g in x])
    alpha = np.clip(out.astype(np.float32) / 255.0 * 1.25, 0.0, 1.0)
    return torch.from_numpy(alpha), torch.from_numpy(d.target.astype(np.int64))


class World:
    """Renders batches of (image [B, 3, S, S] in [0, 1], digit, colour, background, caption) from a seeded Generator."""

    def __init__(self, cfg: WorldConfig, glyphs: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.cfg = cfg
        self.alpha, self.labels = glyphs if glyphs is not None else load_glyphs(cfg.glyph)
        idx = np.arange(len(self.labels))
        self.train_idx = idx[idx % cfg.held_every != 0]  # 1,437 glyphs: generator and classifier training
        self.held_idx = idx[idx % cfg.held_every == 0]  # 360 glyphs: the classifier's held-out accuracy
        s = cfg.size
        self.yy, self.xx = np.mgrid[0:s, 0:s]

    def background(self, kind: str, rng: np.random.Generator) -> np.ndarray:
        """A grey [S, S] pattern: two grey levels, random phase; periods in pixels of a 16x16 image (scaled)."""
        g0 = rng.uniform(0.12, 0.28)
        g1 = g0 + rng.uniform(0.25, 0.35)
        k = max(1, self.cfg.size // 16)  # pattern scale
        ph = rng.integers(0, 12 * k, size=2)
        x, y = (self.xx + ph[0]) // k, (self.yy + ph[1]) // k
        if kind == "stripes":  # diagonal stripes, period 4
            m = ((x + y) // 2) % 2 == 0
        elif kind == "dots":  # single dots on a 3-pixel grid
            m = (x % 3 == 0) & (y % 3 == 0)
        elif kind == "checks":  # 2x2 squares
            m = ((x // 2) + (y // 2)) % 2 == 0
        elif kind == "plain":
            return np.full(self.xx.shape, (g0 + g1) / 2, dtype=np.float32)
        else:
            raise ValueError(f"unknown background {kind!r} (one of {BACKGROUNDS})")
        return np.where(m, g1, g0).astype(np.float32)

    def render(self, glyph: int, colour: str, background: str, rng: np.random.Generator) -> np.ndarray:
        """One image [3, S, S] in [0, 1]: MNIST glyph ``glyph`` in ``colour`` over ``background``."""
        cfg = self.cfg
        bg = self.background(background, rng)
        alpha = np.zeros_like(bg)
        off = (cfg.size - cfg.glyph) // 2 + rng.integers(-cfg.shift, cfg.shift + 1, size=2)
        alpha[off[0] : off[0] + cfg.glyph, off[1] : off[1] + cfg.glyph] = self.alpha[glyph].numpy()
        rgb = np.clip(np.asarray(COLOURS[colour]) + rng.uniform(-cfg.colour_jitter, cfg.colour_jitter, 3), 0, 1)
        img = bg[None] * (1 - alpha[None]) + rgb[:, None, None].astype(np.float32) * alpha[None]
        img = img + rng.normal(0, 0.015, img.shape).astype(np.float32)
        return np.clip(img, 0, 1).astype(np.float32)

    def batch(self, n: int, rng: np.random.Generator, split: str = "train", captions: bool = True) -> dict:
        """``n`` random samples (uniform digit glyph, colour, background) with their labels and random captions."""
        cfg = self.cfg
        pool = self.train_idx if split == "train" else self.held_idx
        glyphs = rng.choice(pool, size=n)
        col = rng.integers(0, len(cfg.colours), n)
        bgi = rng.integers(0, len(cfg.backgrounds), n)
        imgs = np.stack([self.render(int(g), cfg.colours[c], cfg.backgrounds[b], rng)
                         for g, c, b in zip(glyphs, col, bgi, strict=True)])
        digit = self.labels[glyphs].long()
        out = {"image": torch.from_numpy(imgs), "digit": digit, "colour": torch.from_numpy(col).long(),
               "background": torch.from_numpy(bgi).long()}
        if captions:
            caps = []
            for d, c, b in zip(digit.tolist(), col, bgi, strict=True):
                if rng.random() < cfg.p_uncond:
                    caps.append("")
                    continue
                keep = rng.random(3) < cfg.p_keep
                caps.append(caption(d if keep[0] else None, cfg.colours[c] if keep[1] else None,
                                    cfg.backgrounds[b] if keep[2] else None))
            out["caption"] = caps
        return out


class WordEncoder(nn.Module):
    """A learned word-level text encoder: caption -> token states [B, MAX_WORDS, D] and a pooled vector [B, P].

    Token i is word embedding + position embedding (pads included, so "" is a learned null caption); the pooled
    vector is a linear map of the mean over the real words (a learned null vector for "")."""

    def __init__(self, dim: int, pooled_dim: int, vocab: tuple[str, ...] = VOCAB, max_words: int = MAX_WORDS):
        super().__init__()
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.max_words = max_words
        self.word = nn.Embedding(len(self.vocab), dim)
        self.pos = nn.Parameter(torch.zeros(max_words, dim))
        self.null = nn.Parameter(torch.zeros(dim))
        self.pool = nn.Linear(dim, pooled_dim)
        nn.init.normal_(self.word.weight, std=0.5)
        nn.init.normal_(self.pos, std=0.1)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        ids = torch.zeros(len(captions), self.max_words, dtype=torch.long)
        for i, c in enumerate(captions):
            words = c.split()
            if len(words) > self.max_words:
                raise ValueError(f"caption {c!r} has {len(words)} words, at most {self.max_words}")
            for j, w in enumerate(words):
                if w not in self.index:
                    raise ValueError(f"caption {c!r}: unknown word {w!r} (vocabulary: {' '.join(self.vocab[1:])})")
                ids[i, j] = self.index[w]
        return ids

    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tokenize(captions).to(self.pos.device)
        emb = self.word(ids)
        real = (ids != 0).float().unsqueeze(-1)
        mean = (emb * real).sum(1) / real.sum(1).clamp_min(1.0)
        mean = torch.where(real.sum(1) > 0, mean, self.null.expand_as(mean))
        return emb + self.pos, self.pool(mean)


class WorldClassifier(nn.Module):
    """Small CNN on [B, 3, S, S] images in [0, 1] (S = 16 or 32) with three heads: digit (10), colour, background."""

    def __init__(self, n_colours: int = len(COLOURS), n_backgrounds: int = len(BACKGROUNDS), width: int = 16):
        super().__init__()
        w = width

        def block(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                                 nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))

        self.body = nn.Sequential(block(3, w), block(w, 2 * w), block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(2),
                                  nn.Flatten(), nn.Linear(16 * w, 128), nn.ReLU())
        self.digit = nn.Linear(128, 10)
        self.colour = nn.Linear(128, n_colours)
        self.background = nn.Linear(128, n_backgrounds)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x * 2 - 1)
        return {"digit": self.digit(h), "colour": self.colour(h), "background": self.background(h)}
