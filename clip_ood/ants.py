"""ANTS test-time state (Zhu et al., "Adaptive Negative Textual Space Shaping for OOD Detection via Test-Time
MLLM Understanding and Reasoning"): ENS far-negative cache, VSNL near negatives, adaptive score.

Threshold rule of this implementation (the images whose base NegLabel score is below tau are "negative images"):
tau starts at 0.8; once ``warmup`` (200) scores were seen, after every batch a 10-bin histogram of the seen scores is
taken; tau is the centre of its deepest valley (a bin holding at most half of the lower of the two highest bins
beside it; depth = that bin count minus its own), otherwise the upper edge of the lowest bin. Our earlier reading (the
first valley left of the highest bin) assumed the highest bin is the ID mode; ours assumes nothing about the share:
``percentile`` (default 1.0 = off) can cap tau at a quantile of the seen scores; the earlier default 0.5 (the
median: never more than half of the stream counts as negative) never bound on ``benchmarks/ants_share.py`` and
assumed a mostly-ID stream.

Scores (the paper's): S_ens / S_vsnl = NegLabel against [far bank | mined negatives] / [near names | mined
negatives]; S_ada = lambda * S_ens + (1 - lambda) * S_vsnl with lambda = (1 - a) / ((1 - a) + (1 - b)), a / b the
running means of S_ens / S_vsnl over the negative images.

VSNL classes: the paper asks for similar names of the ``vsnl_top_classes`` (40) most-predicted ID classes among the
negative images, from batch ``vsnl_start``. Ours (``vsnl_start="auto"``): with no more ID classes than that,
every class is taken from batch 0 (the wait only collects the counts); with more, the top-k of the counts so far is
taken from batch 0 and refreshed after every batch up to batch 10 (names are cached per class, so a refresh only adds
classes), then every ``vsnl_every`` batches. Measured on ``benchmarks/ants_share.py``: waiting for the counts was
what made ANTS worse than NegLabel on a stream that starts with its OOD images (the OOD images were scored before
the near names existed, the ID images after). An integer ``vsnl_start`` keeps the plain schedule.

Registered as the score ``"ants"`` at the bottom of this module: NegLabel (``clip_ood.neglabel``) as its base score,
``ANTSState.from_inputs`` as its test-time state (an ``OODScorer`` keeps it in ``scorer.state``).
"""

from __future__ import annotations

import json
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from clip_ood.encoders import encode_labels
from clip_ood.lexicon import NOUN_TEMPLATE
from clip_ood.neglabel import neglabel_bind, neglabel_score
from clip_ood.score_registry import ScoreInputs, register_score

MODES = ("ada", "far_only", "near_only")


def histogram_threshold(scores: Any, bins: int = 10, percentile: float = 1.0) -> float:
    """tau from seen base scores: the centre of the deepest valley of a 10-bin histogram (else the lowest bin's
    upper edge), capped at the ``percentile`` quantile (1.0: no cap).

    A valley is a bin v holding at most half of min(highest bin left of v, highest bin right of v); its depth is
    that minimum - count(v) (binning noise on a flat histogram is no valley), and ties go to the leftmost (fewest
    images called negative). Which side holds more images does not matter, so a stream that is mostly OOD is
    split as well as one that is mostly ID (the earlier rule looked left of the highest bin, which is the OOD mode
    once OOD images are the majority).
    """
    h = np.asarray(scores, dtype=np.float64)
    counts, edges = np.histogram(h, bins=bins)
    tau_hist, best = float(edges[1]), 0
    for v in range(1, bins - 1):
        side = min(int(counts[:v].max()), int(counts[v + 1:].max()))
        depth = side - int(counts[v])
        if depth > best and counts[v] <= side / 2:  # a real valley: at most half the lower of its two peaks
            tau_hist, best = float((edges[v] + edges[v + 1]) / 2), depth
    return float(min(tau_hist, np.quantile(h, percentile)))


def ants_lambda(a: float, b: float) -> float:
    """lambda = F(a, b) = (1 - a) / ((1 - a) + (1 - b)); 0.5 when both means are 1."""
    den = (1.0 - a) + (1.0 - b)
    return 0.5 if den <= 0 else (1.0 - a) / den


@dataclass
class ANTSConfig:
    """The numeric settings of :class:`ANTSState` (saved with its state as ``cfg``).

    Attributes:
        temperature, num_groups, seed: of the NegLabel base score (``neglabel_score``).
        threshold_init: tau before ``warmup`` scores were seen.
        warmup: scores seen before tau follows the histogram rule (:func:`histogram_threshold`).
        hist_bins: bins of that histogram.
        percentile: caps tau at this quantile of the seen scores (1.0: no cap).
        max_updates: batches whose negative images are described into the far (ENS) bank.
        far_bank_size: far-bank sentences kept (newest first).
        vsnl_start: batch of the first near-name (VSNL) update, or "auto" (see the module docstring).
        vsnl_every: batches between VSNL updates.
        vsnl_top_classes: most-predicted ID classes whose similar names are asked for.
        vsnl_per_class: similar names per class.
        vsnl_cache_size: classes whose names are cached (LRU).
        history_size: base scores kept for the histogram.
    """

    temperature: float = 0.01
    num_groups: int = 100
    seed: int = 0
    threshold_init: float = 0.8
    warmup: int = 200
    hist_bins: int = 10
    percentile: float = 1.0
    max_updates: int = 100
    far_bank_size: int = 10_000
    vsnl_start: int | str = "auto"
    vsnl_every: int = 40
    vsnl_top_classes: int = 40
    vsnl_per_class: int = 5
    vsnl_cache_size: int = 200
    history_size: int = 100_000

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ANTSConfig:
        """From a state's ``cfg`` (a key this class lacks: TypeError naming it)."""
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"unknown ANTS setting(s) {', '.join(unknown)}")
        return cls(**d)


class ANTSState:
    """Mutable test-time state; ``step(features, images)`` updates caches and returns the batch's scores.

    Args:
        encoder: the CLIP encoder (encodes the mined negatives).
        id_labels: the ID class names; id_features [C, D] / neg_features [M, D]: their text features and the
            negative labels'.
        describer: the ENS image describer (None: a ``LexiconDescriber`` over ``encoder``).
        mode: "ada" (far + near, adaptive lambda), "far_only" or "near_only".
        config: the numeric settings (:class:`ANTSConfig`; None: its defaults).
    """

    def __init__(self, encoder: Any, id_labels: Sequence[str], id_features: Tensor, neg_features: Tensor,
                 describer: Any = None, mode: str = "ada", config: ANTSConfig | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown ANTS mode {mode!r}; choose one of {', '.join(MODES)}")
        self.encoder = encoder
        self.id_labels = list(id_labels)
        self.id_features = id_features.float().cpu()
        self.neg_features = neg_features.float().cpu()
        if describer is None:
            from clip_ood.describers import LexiconDescriber

            describer = LexiconDescriber(encoder)
        self.describer = describer
        self.mode = mode
        self.config = config if config is not None else ANTSConfig()
        self.reset()

    @classmethod
    def from_inputs(cls, encoder: Any, id_labels: Sequence[str], inputs: ScoreInputs) -> ANTSState:
        """A fresh state over a scorer's ID and negative features (the registry's ``state`` factory)."""
        return cls(encoder, id_labels, inputs.id_text_features, inputs.neg_text_features,
                   config=ANTSConfig(temperature=inputs.temperature, num_groups=inputs.num_groups, seed=inputs.seed))

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget everything learnt at test time."""
        d = self.id_features.shape[1]
        self.tau = float(self.config.threshold_init)
        self.history: list[float] = []
        self.seen = 0
        self.batches = 0
        self.updates = 0
        self.far_texts: list[str] = []  # ENS sentences, newest first
        self.far_features = torch.zeros(0, d)
        self.near_cache: OrderedDict[str, list[str]] = OrderedDict()  # ID class -> similar names (LRU)
        self.near_texts: list[str] = []
        self.near_features = torch.zeros(0, d)
        self.class_counts: Counter[int] = Counter()
        self.sum_ens = 0.0
        self.sum_vsnl = 0.0
        self.num_neg = 0

    @property
    def lambda_(self) -> float:
        """Adaptive weight from the running means a = E[S_ens], b = E[S_vsnl] over negative images."""
        if self.num_neg == 0:
            return 0.5
        return ants_lambda(self.sum_ens / self.num_neg, self.sum_vsnl / self.num_neg)

    def _neglabel(self, feats: Tensor, extra: Tensor) -> Tensor:
        negs = torch.cat([extra, self.neg_features]) if extra.numel() else self.neg_features
        return neglabel_score(feats, self.id_features, negs, self.config.temperature, self.config.num_groups,
                              self.config.seed)

    # ------------------------------------------------------------------ ENS
    def _update_ens(self, feats: Tensor, images: Sequence[Any] | None) -> int:
        """Describe negative images, dedupe, encode, prepend to the far bank; returns how many were added."""
        sentences = self.describer.describe(images, feats)
        known = set(self.far_texts)
        new: list[str] = []
        for s in sentences:
            s = " ".join(str(s).split())
            if s and s not in known:
                known.add(s)
                new.append(s)
        if new:
            f = encode_labels(self.encoder, new, ("{}",), cache_dir=False)
            self.far_texts = (new + self.far_texts)[: self.config.far_bank_size]
            self.far_features = torch.cat([f, self.far_features])[: self.config.far_bank_size]
        self.updates += 1
        return len(new)

    # ------------------------------------------------------------------ VSNL
    @property
    def _all_classes_near(self) -> bool:
        """No more ID classes than ``vsnl_top_classes``: every class is among the top-k, whatever is predicted."""
        return len(self.id_labels) <= int(self.config.vsnl_top_classes)

    def _vsnl_due(self) -> bool:
        start = self.config.vsnl_start
        b, every = self.batches, self.config.vsnl_every
        if start == "auto":  # waiting only collects predicted-class counts; with every class taken, none needed
            if self._all_classes_near:
                start = 0
            elif b < 10:  # more classes than the top-k: the top-k of the counts so far, refreshed every batch
                return True  # while the counts form (names are cached per class: a refresh only adds classes)
            else:
                start = 10
        return b >= start and (b - start) % every == 0

    def _update_vsnl(self) -> None:
        """Ask for visually similar names of the most-predicted ID classes (cached per class, LRU eviction)."""
        ids = {c.lower() for c in self.id_labels}
        # the paper: the top-k most-predicted classes of the negative images. With no more classes than k, all
        # of them (ours): the near names then do not depend on which images came first.
        ranked = (range(len(self.id_labels)) if self._all_classes_near
                  else [c for c, _ in self.class_counts.most_common(self.config.vsnl_top_classes)])
        for c in ranked:
            name = self.id_labels[c]
            if name in self.near_cache:
                self.near_cache.move_to_end(name)
                continue
            sims = self.describer.similar_labels(name, self.config.vsnl_per_class)
            self.near_cache[name] = [s for s in sims if s.lower() not in ids][: self.config.vsnl_per_class]
            while len(self.near_cache) > self.config.vsnl_cache_size:
                self.near_cache.popitem(last=False)
        texts = list(dict.fromkeys(t for v in self.near_cache.values() for t in v))
        if texts != self.near_texts:
            self.near_texts = texts
            self.near_features = (encode_labels(self.encoder, texts, (NOUN_TEMPLATE,), cache_dir=False)
                                  if texts else torch.zeros(0, self.id_features.shape[1]))

    # ------------------------------------------------------------------ step
    def step(self, feats: Tensor, images: Sequence[Any] | None = None) -> dict[str, Tensor]:
        """Update the state with one test batch and return its scores (score, s_ens, s_vsnl, base, negative)."""
        feats = feats.float().cpu()
        base = self._neglabel(feats, torch.zeros(0))
        neg_mask = base < self.tau
        idx = neg_mask.nonzero().flatten().tolist()
        if idx:
            preds = (feats[idx] @ self.id_features.T).argmax(dim=-1).tolist()
            self.class_counts.update(preds)
            if self.updates < self.config.max_updates:
                self._update_ens(feats[idx], [images[i] for i in idx] if images is not None else None)
        if self._vsnl_due():
            self._update_vsnl()
        s_ens = self._neglabel(feats, self.far_features)
        s_vsnl = self._neglabel(feats, self.near_features)
        if idx:
            self.sum_ens += float(s_ens[idx].sum())
            self.sum_vsnl += float(s_vsnl[idx].sum())
            self.num_neg += len(idx)
        # history and threshold
        self.history.extend(base.tolist())
        if len(self.history) > self.config.history_size:
            self.history = self.history[-self.config.history_size:]
        self.seen += feats.shape[0]
        self.batches += 1
        if self.seen >= self.config.warmup:
            self.tau = histogram_threshold(self.history, self.config.hist_bins, self.config.percentile)
        lam = self.lambda_
        if self.mode == "far_only":
            score = s_ens
        elif self.mode == "near_only":
            score = s_vsnl
        else:
            score = lam * s_ens + (1 - lam) * s_vsnl  # S_ada = lambda * S_ens + (1 - lambda) * S_vsnl
        return {"score": score, "s_ens": s_ens, "s_vsnl": s_vsnl, "base": base, "negative": neg_mask,
                "lambda": torch.full_like(score, lam)}

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "cfg": asdict(self.config), "tau": self.tau, "history": self.history,
                "seen": self.seen, "batches": self.batches, "updates": self.updates, "far_texts": self.far_texts,
                "near_cache": list(self.near_cache.items()), "near_texts": self.near_texts,
                "class_counts": {str(k): v for k, v in self.class_counts.items()}, "sum_ens": self.sum_ens,
                "sum_vsnl": self.sum_vsnl, "num_neg": self.num_neg, "id_labels": self.id_labels}

    def save(self, path: str | Path) -> None:
        """Write ``PATH.json`` (counters, texts, caches) and ``PATH.safetensors`` (bank features), atomically
        (the features first: the JSON marks a complete state)."""
        from safetensors.torch import save

        from vision.io import write_bytes_atomic, write_text_atomic

        base = Path(path)
        write_bytes_atomic(base.with_suffix(".safetensors"),
                           save({"far": self.far_features.contiguous(), "near": self.near_features.contiguous()}))
        write_text_atomic(base.with_suffix(".json"), json.dumps(self.state_dict()))

    def load(self, path: str | Path) -> ANTSState:
        """Restore a state written by ``save`` (the ID labels must match). A state file that is cut short,
        edited by hand or missing its features file is a ValueError naming the file; nothing is changed then."""
        from vision.engine import read_weights
        from vision.io import read_json

        base = Path(path)
        jfile, tfile = base.with_suffix(".json"), base.with_suffix(".safetensors")
        st = read_json(jfile, "not a readable ANTS state (move it away to start afresh)")
        missing = [k for k in self.state_dict() if not isinstance(st, dict) or k not in st]  # what save() writes
        if missing:
            raise ValueError(f"{jfile}: not an ANTS state of negvision (lacks {', '.join(missing[:5])})")
        if st["id_labels"] != self.id_labels:
            raise ValueError(f"{jfile}: ANTS state was saved for other ID labels")
        if not tfile.is_file():
            raise ValueError(f"{tfile}: not found; the ANTS state {jfile} needs its features file")
        t = read_weights(tfile)  # CheckpointCorruptError (a ValueError) naming a truncated file
        if "far" not in t or "near" not in t:
            raise ValueError(f"{tfile}: not the features of an ANTS state (needs 'far' and 'near')")
        try:
            near_cache = OrderedDict((k, v) for k, v in st["near_cache"])
            class_counts = Counter({int(k): v for k, v in st["class_counts"].items()})
            config = ANTSConfig.from_dict(st["cfg"])
        except (TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{jfile}: damaged ANTS state ({e})") from None
        self.mode, self.config = st["mode"], config
        self.tau, self.history, self.seen = st["tau"], st["history"], st["seen"]
        self.batches, self.updates = st["batches"], st["updates"]
        self.far_texts, self.far_features = st["far_texts"], t["far"]
        self.near_cache = near_cache
        self.near_texts, self.near_features = st["near_texts"], t["near"]
        self.class_counts = class_counts
        self.sum_ens, self.sum_vsnl, self.num_neg = st["sum_ens"], st["sum_vsnl"], st["num_neg"]
        return self


# ANTS: its base score is NegLabel; the test-time state adds the far (ENS) and near (VSNL) negatives
register_score("ants", needs_negatives=True, bind=neglabel_bind, state=ANTSState.from_inputs)(neglabel_score)
