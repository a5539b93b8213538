"""Image-caption pairs for DCAR: FDRD JSON and a generic CSV / JSONL (image, caption, category, attributes).

FDRD JSON: a list (or JSON lines) of ``{file_name, file_path, positive, negative: [...]}``. The image is
``file_path`` if it already ends with ``file_name``, else ``file_path/file_name``, relative to ``image_root``
(default: the JSON's folder). The category is the record's ``category`` key if present, else the name of the
image's parent folder. Generic CSV (header ``image,caption,category,attributes[,negatives]``) or JSONL
(same keys): attributes and negatives are ``;``-separated strings (CSV) or lists (JSONL). Errors name the
file and line (CSV: physical line incl. header; JSON list: record number); ``skip_bad=True`` warns and skips.
"""

from __future__ import annotations

import csv
import json
import random
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset


class PairDataError(ValueError):
    """A malformed line in a caption file (names the file and line)."""


@dataclass
class Pair:
    """One image-caption pair."""

    image: str
    caption: str
    category: str | None = None
    attributes: list[str] = field(default_factory=list)
    negatives: list[str] = field(default_factory=list)
    line: int = 0


def _split_list(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return [str(x).strip() for x in v if str(x).strip()]
    return [x.strip() for x in re.split(r"[;|]", str(v)) if x.strip()]


def _fdrd_image(rec: dict, root: Path) -> Path:
    name, fpath = str(rec.get("file_name") or ""), str(rec.get("file_path") or "")
    p = Path(fpath) if fpath.endswith(name) and fpath else Path(fpath) / name
    return p if p.is_absolute() else root / p


def _raw_records(path: Path) -> tuple[str, list[tuple[int, dict]]]:
    """(format, [(line, record)]) for .json / .jsonl / .csv files."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "image" not in reader.fieldnames or "caption" not in reader.fieldnames:
                raise PairDataError(f"{path}: line 1: CSV header must have 'image' and 'caption' columns, "
                                    f"got {reader.fieldnames}")
            return "generic", [(reader.line_num, dict(row)) for row in reader]
    text = path.read_text(encoding="utf-8")
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PairDataError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from e
        recs = [(i + 1, r) for i, r in enumerate(data)]
    else:
        recs = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                recs.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                raise PairDataError(f"{path}: line {i}: invalid JSON ({e.msg})") from e
    first = recs[0][1] if recs else {}
    fmt = "fdrd" if isinstance(first, dict) and "positive" in first else "generic"
    return fmt, recs


def load_pairs(path: str | Path, image_root: str | Path | None = None, categories: Sequence[str] | None = None,
               skip_bad: bool = False, check_images: bool = True) -> list[Pair]:
    """Read pairs from FDRD JSON or CSV/JSONL; unknown categories (if ``categories`` given), empty captions and
    missing images raise :class:`PairDataError` naming the line (or are skipped with a warning)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption file '{path}' not found")
    root = Path(image_root) if image_root else path.parent
    known = set(categories) if categories is not None else None
    fmt, recs = _raw_records(path)
    kind = "record" if (fmt == "fdrd" and path.suffix.lower() == ".json") else "line"
    out: list[Pair] = []
    for line, rec in recs:
        where = f"{path}: {kind} {line}"
        try:
            if not isinstance(rec, dict):
                raise PairDataError(f"{where}: expected an object, got {type(rec).__name__}")
            if fmt == "fdrd":
                for k in ("file_name", "positive"):
                    if k not in rec:
                        raise PairDataError(f"{where}: missing key '{k}'")
                img = _fdrd_image(rec, root)
                caption = str(rec.get("positive") or "").strip()
                category = rec.get("category") or img.parent.name or None
                attrs = _split_list(rec.get("attributes"))
                negs = _split_list(rec.get("negative"))
            else:
                if not rec.get("image"):
                    raise PairDataError(f"{where}: empty 'image'")
                img = Path(str(rec["image"]).strip())
                img = img if img.is_absolute() else root / img
                caption = str(rec.get("caption") or "").strip()
                category = (str(rec.get("category")).strip() or None) if rec.get("category") is not None else None
                attrs = _split_list(rec.get("attributes"))
                negs = _split_list(rec.get("negatives"))
            if not caption:
                raise PairDataError(f"{where}: empty caption")
            if known is not None and category not in known:
                raise PairDataError(f"{where}: unknown category '{category}' (known: {sorted(known)[:10]}...)")
            if check_images and not img.is_file():
                raise PairDataError(f"{where}: image file '{img}' not found")
        except PairDataError as e:
            if skip_bad:
                warnings.warn(f"skipped: {e}", stacklevel=2)
                continue
            raise
        out.append(Pair(str(img), caption, category, attrs, negs, line))
    if not out:
        raise PairDataError(f"{path}: no usable pairs")
    return out


def verify_pair_images(pairs: Sequence[Pair], source: str | Path, skip_bad: bool = False,
                       workers: int = 4) -> tuple[list[Pair], list[str]]:
    """Decode every image of ``pairs`` once (EXIF applied) before training or evaluation starts, so a broken file
    cannot stop a run half-way. Returns (the pairs whose image reads, one message per bad one: file, line, why).
    Without ``skip_bad`` a bad image raises :class:`PairDataError` listing the first five and the count."""
    from concurrent.futures import ThreadPoolExecutor

    from vision.io import ImageReadError, open_image

    def problem(p: Pair) -> str | None:
        try:
            open_image(p.image, "RGB").close()
        except ImageReadError as e:
            return f"{source}: line {p.line}: {e}"
        return None

    first: dict[str, Pair] = {}  # a file captioned several times is decoded once (its first line is named)
    for p in pairs:
        first.setdefault(p.image, p)
    with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL decodes outside the GIL
        found = dict(zip(first, pool.map(problem, first.values()), strict=True))
    bad = {im: msg for im, msg in found.items() if msg is not None}
    if bad and not skip_bad:
        shown = "\n  ".join(list(bad.values())[:5])
        more = f"\n  ... and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise PairDataError(f"{len(bad)} unreadable image(s) in {source} (--skip-bad leaves them out):\n  "
                            f"{shown}{more}")
    good = [p for p in pairs if p.image not in bad]
    if not good:
        raise PairDataError(f"{source}: no readable image")
    return good, list(bad.values())


def categories_of(pairs: Sequence[Pair]) -> list[str]:
    """Sorted distinct categories (None excluded)."""
    return sorted({p.category for p in pairs if p.category is not None})


def attribute_vocab(pairs: Sequence[Pair]) -> list[str]:
    """Sorted distinct attribute descriptions."""
    return sorted({a for p in pairs for a in p.attributes})


def swap_class_name(caption: str, category: str, other: str) -> str | None:
    """The caption with the whole-word class name replaced by another category's name (None if absent)."""
    pat = re.compile(rf"(?<!\w){re.escape(category)}(?!\w)", flags=re.IGNORECASE)
    if not pat.search(caption):
        return None
    return pat.sub(other, caption)


class PairDataset(Dataset):
    """Pairs -> dicts {image: Tensor, caption, category, attributes, negatives, index}; images cached in memory."""

    def __init__(self, pairs: Sequence[Pair], preprocess: Callable, cache: bool = True):
        self.pairs = list(pairs)
        self.preprocess = preprocess
        self._cache: dict[int, Tensor] = {} if cache else None  # type: ignore[assignment]

    def __len__(self) -> int:
        return len(self.pairs)

    def image(self, i: int) -> Tensor:
        """Preprocessed image i, in its displayed orientation (EXIF); errors name the file and line."""
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        from vision.io import open_image

        p = self.pairs[i]
        try:
            x = self.preprocess(open_image(p.image, "RGB"))
        except Exception as e:
            raise PairDataError(f"line {p.line}: cannot read image '{p.image}': {e}") from e
        if self._cache is not None:
            self._cache[i] = x
        return x

    def __getitem__(self, i: int) -> dict:
        p = self.pairs[i]
        return {"image": self.image(i), "caption": p.caption, "category": p.category,
                "attributes": list(p.attributes), "negatives": list(p.negatives), "index": i}


def collate_pairs(items: Sequence[dict]) -> dict:
    """Stack images, keep the text fields as lists."""
    return {"images": torch.stack([it["image"] for it in items]),
            "captions": [it["caption"] for it in items],
            "categories": [it["category"] for it in items],
            "attributes": [it["attributes"] for it in items],
            "negatives": [it["negatives"] for it in items],
            "index": torch.tensor([it["index"] for it in items])}


def sample_negatives(caption: str, category: str | None, given: Sequence[str], categories: Sequence[str],
                     k: int, rng: random.Random) -> list[tuple[str, str | None]]:
    """Up to k extra negatives (text, its category): the given (FDRD) ones first, then class-name swaps."""
    out: list[tuple[str, str | None]] = []
    given = list(given)
    rng.shuffle(given)
    for g in given[:k]:
        out.append((g, _category_in(g, categories, exclude=category)))
    if category is not None and len(out) < k:
        others = [c for c in categories if c != category]
        rng.shuffle(others)
        for c in others:
            if len(out) >= k:
                break
            s = swap_class_name(caption, category, c)
            if s is None:
                break
            out.append((s, c))
    return out


def _category_in(text: str, categories: Sequence[str], exclude: str | None) -> str | None:
    """A known category named (whole word) in text, other than ``exclude``; None if none."""
    for c in categories:
        if c != exclude and re.search(rf"(?<!\w){re.escape(c)}(?!\w)", text, flags=re.IGNORECASE):
            return c
    return None


class HardNegativeBatchSampler(torch.utils.data.Sampler):
    """Batches in which ``hard_share`` of the pairs come in groups of ``group_size`` that share every attribute but
    not the category (e.g. the same colour and background, different digits), so the in-batch negatives of those
    pairs differ from their positive only in the class, which is what category-level negatives are for; the rest
    of each batch is drawn at random. Every pair is used once per epoch; the order depends on (seed, epoch) only
    (``set_epoch``), so resuming replays it.
    """

    def __init__(self, pairs: Sequence[Pair], batch_size: int, hard_share: float = 0.5, group_size: int = 4,
                 seed: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= hard_share <= 1.0:
            raise ValueError(f"hard_share must be in [0, 1], got {hard_share}")
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2 (a pair and a hard negative), got {group_size}")
        self.batch_size, self.hard_share, self.group_size, self.seed = batch_size, hard_share, group_size, seed
        self.categories = [p.category for p in pairs]
        self.keys = [tuple(sorted(p.attributes)) if p.attributes and p.category is not None else None for p in pairs]
        self.n = len(pairs)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def _groups(self, rng: random.Random) -> tuple[list[list[int]], list[int]]:
        """Hard groups (same attributes, distinct categories) and the indices left over."""
        by_key: dict[tuple, list[int]] = {}
        rest: list[int] = []
        for i, k in enumerate(self.keys):
            (rest if k is None else by_key.setdefault(k, [])).append(i)
        groups: list[list[int]] = []
        for k in sorted(by_key):
            pool = by_key[k]
            rng.shuffle(pool)
            while True:
                group, seen, left = [], set(), []
                for i in pool:
                    if len(group) < self.group_size and self.categories[i] not in seen:
                        group.append(i)
                        seen.add(self.categories[i])
                    else:
                        left.append(i)
                if len(group) < 2:  # no other category left with these attributes
                    rest += pool
                    break
                groups.append(group)
                pool = left
        rng.shuffle(groups)
        rng.shuffle(rest)
        return groups, rest

    def __iter__(self):
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        groups, rest = self._groups(rng)
        want_hard = round(self.hard_share * self.batch_size)
        need, kept = want_hard * len(self), []  # pairs the hard parts take; the other groups go back to random
        for g in groups:
            if need >= len(g):
                kept.append(g)
                need -= len(g)
            else:
                rest += g
        groups = kept
        rng.shuffle(rest)
        for _ in range(len(self)):
            batch: list[int] = []
            while groups and len(batch) + len(groups[-1]) <= max(want_hard, 2) and len(batch) < want_hard:
                batch += groups.pop()
            while rest and len(batch) < self.batch_size:
                batch.append(rest.pop())
            while groups and len(batch) < self.batch_size:  # no random pairs left: more groups
                g = groups.pop()
                room = self.batch_size - len(batch)
                batch += g[:room]
                if g[room:]:
                    rest += g[room:]
            if batch:
                yield batch
