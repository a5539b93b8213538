"""ANTS test-time state (Zhu et al., "Adaptive Negative Textual Space Shaping for OOD Detection via Test-Time
MLLM Understanding and Reasoning"): ENS far-negative cache, VSNL near negatives, adaptive score.

Threshold rule of this implementation (the images whose base NegLabel score is below tau are "negative images"):
tau starts at 0.8; once ``warmup`` (200) scores were seen, after every batch a 10-bin histogram of the seen scores is
taken; if it is bimodal (a bin left of the highest bin is a valley with a higher bin further left), tau_hist is the
centre of that valley bin, otherwise the upper edge of the lowest bin; then tau = min(tau_hist, quantile(scores, 0.5))
(the 0.5-percentile update: never more than half of the stream counts as negative).
"""

from __future__ import annotations

import json
from collections import Counter, OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from clip_ood.encoders import encode_labels
from clip_ood.lexicon import NOUN_TEMPLATE
from clip_ood.scores import neglabel_score

MODES = ("ada", "far_only", "near_only")


def histogram_threshold(scores: Any, bins: int = 10, percentile: float = 0.5) -> float:
    """tau from seen base scores: valley of a bimodal 10-bin histogram (else lowest bin's upper edge), capped at
    the ``percentile`` quantile."""
    h = np.asarray(scores, dtype=np.float64)
    counts, edges = np.histogram(h, bins=bins)
    peak = int(np.argmax(counts))
    tau_hist = float(edges[1])
    if peak >= 2:
        v = int(np.argmin(counts[:peak]))  # first minimum left of the main (ID) mode
        if v >= 1 and counts[:v].max() > counts[v]:
            tau_hist = float((edges[v] + edges[v + 1]) / 2)
    return float(min(tau_hist, np.quantile(h, percentile)))


def ants_lambda(a: float, b: float) -> float:
    """lambda = F(a, b) = (1 - a) / ((1 - a) + (1 - b)); 0.5 when both means are 1."""
    den = (1.0 - a) + (1.0 - b)
    return 0.5 if den <= 0 else (1.0 - a) / den


class ANTSState:
    """Mutable test-time state; ``step(features, images)`` updates caches and returns the batch's scores."""

    def __init__(self, encoder: Any, id_labels: Sequence[str], id_features: Tensor, neg_features: Tensor,
                 describer: Any = None, mode: str = "ada", temperature: float = 0.01, num_groups: int = 100,
                 seed: int = 0, threshold_init: float = 0.8, warmup: int = 200, hist_bins: int = 10,
                 percentile: float = 0.5, max_updates: int = 100, far_bank_size: int = 10_000,
                 vsnl_start: int = 10, vsnl_every: int = 40, vsnl_top_classes: int = 40, vsnl_per_class: int = 5,
                 vsnl_cache_size: int = 200, history_size: int = 100_000) -> None:
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
        self.cfg = dict(temperature=temperature, num_groups=num_groups, seed=seed, threshold_init=threshold_init,
                        warmup=warmup, hist_bins=hist_bins, percentile=percentile, max_updates=max_updates,
                        far_bank_size=far_bank_size, vsnl_start=vsnl_start, vsnl_every=vsnl_every,
                        vsnl_top_classes=vsnl_top_classes, vsnl_per_class=vsnl_per_class,
                        vsnl_cache_size=vsnl_cache_size, history_size=history_size)
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget everything learnt at test time."""
        d = self.id_features.shape[1]
        self.tau = float(self.cfg["threshold_init"])
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
        return neglabel_score(feats, self.id_features, negs, self.cfg["temperature"], self.cfg["num_groups"],
                              self.cfg["seed"])

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
            self.far_texts = (new + self.far_texts)[: self.cfg["far_bank_size"]]
            self.far_features = torch.cat([f, self.far_features])[: self.cfg["far_bank_size"]]
        self.updates += 1
        return len(new)

    # ------------------------------------------------------------------ VSNL
    def _vsnl_due(self) -> bool:
        b, start, every = self.batches, self.cfg["vsnl_start"], self.cfg["vsnl_every"]
        return b >= start and (b - start) % every == 0

    def _update_vsnl(self) -> None:
        """Ask for visually similar names of the most-predicted ID classes (cached per class, LRU eviction)."""
        ids = {c.lower() for c in self.id_labels}
        for c, _ in self.class_counts.most_common(self.cfg["vsnl_top_classes"]):
            name = self.id_labels[c]
            if name in self.near_cache:
                self.near_cache.move_to_end(name)
                continue
            sims = self.describer.similar_labels(name, self.cfg["vsnl_per_class"])
            self.near_cache[name] = [s for s in sims if s.lower() not in ids][: self.cfg["vsnl_per_class"]]
            while len(self.near_cache) > self.cfg["vsnl_cache_size"]:
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
            if self.updates < self.cfg["max_updates"]:
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
        if len(self.history) > self.cfg["history_size"]:
            self.history = self.history[-self.cfg["history_size"]:]
        self.seen += feats.shape[0]
        self.batches += 1
        if self.seen >= self.cfg["warmup"]:
            self.tau = histogram_threshold(self.history, self.cfg["hist_bins"], self.cfg["percentile"])
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
        return {"mode": self.mode, "cfg": self.cfg, "tau": self.tau, "history": self.history, "seen": self.seen,
                "batches": self.batches, "updates": self.updates, "far_texts": self.far_texts,
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
        """Restore a state written by ``save`` (the ID labels must match)."""
        from safetensors.torch import load_file

        base = Path(path)
        st = json.loads(base.with_suffix(".json").read_text(encoding="utf-8"))
        if st["id_labels"] != self.id_labels:
            raise ValueError(f"{base.with_suffix('.json')}: ANTS state was saved for other ID labels")
        t = load_file(str(base.with_suffix(".safetensors")))
        self.mode, self.cfg = st["mode"], st["cfg"]
        self.tau, self.history, self.seen = st["tau"], st["history"], st["seen"]
        self.batches, self.updates = st["batches"], st["updates"]
        self.far_texts, self.far_features = st["far_texts"], t["far"]
        self.near_cache = OrderedDict((k, v) for k, v in st["near_cache"])
        self.near_texts, self.near_features = st["near_texts"], t["near"]
        self.class_counts = Counter({int(k): v for k, v in st["class_counts"].items()})
        self.sum_ens, self.sum_vsnl, self.num_neg = st["sum_ens"], st["sum_vsnl"], st["num_neg"]
        return self
