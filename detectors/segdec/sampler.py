"""Frequency-of-use negative sampling (Mixed supervision, 2021) as an index ``Sampler``.

Each epoch holds every positive once plus as many negatives, drawn without replacement with probabilities
that favour rarely used negatives. The official code draws inside ``Dataset.__getitem__`` and counts uses
there, which only works with ``num_workers=0``; here the whole epoch is decided in the main process when the
``DataLoader`` asks for indices, so it works with worker processes and with several GPUs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["FrequencySampler", "frequency_sampling_probs"]


def frequency_sampling_probs(freq: Any) -> torch.Tensor:
    """Sampling probabilities of N negatives from how often each was used (float64 tensor summing to 1).

    All-zero -> uniform; else p = 1 - f / max f; p = p - median(p) + 1; p = p ** (4 ln N); p / sum p.
    """
    f = torch.as_tensor(np.asarray(freq, dtype=np.float64) if not isinstance(freq, torch.Tensor) else freq)
    f = f.detach().to(torch.float64).reshape(-1).cpu()
    n = f.numel()
    if n == 0:
        raise ValueError("frequency_sampling_probs: empty frequency vector")
    if not torch.isfinite(f).all() or (f < 0).any():
        raise ValueError("frequency_sampling_probs: frequencies must be finite and >= 0")
    fmax = float(f.max())
    if fmax == 0:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    p = 1.0 - f / fmax  # p = 1 - f / max f
    p = p - torch.quantile(p, 0.5) + 1.0  # p = p - median(p) + 1 (median as numpy: mean of the middle two)
    p = p.clamp_min(0.0) ** (4.0 * math.log(n))  # p = p ** (4 ln N)
    s = float(p.sum())
    if not math.isfinite(s) or s <= 0:  # cannot happen for finite inputs; keep the sampler alive regardless
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    return p / s


def _draw_without_replacement(p: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """k distinct indices, successive sampling proportional to ``p`` (Gumbel top-k); zero-probability items
    come last, in random order, if k exceeds the number of non-zero entries."""
    n = p.numel()
    u = torch.rand(n, generator=g, dtype=torch.float64).clamp_(1e-300, 1.0)
    keys = torch.log(p) - torch.log(-torch.log(u))  # log p + Gumbel noise
    tie = torch.rand(n, generator=g, dtype=torch.float64)
    zero = p <= 0
    keys[zero] = -torch.inf
    order = torch.argsort(keys, descending=True, stable=True)
    nz = int((~zero).sum())
    if k > nz:
        rest = torch.nonzero(zero).flatten()
        rest = rest[torch.argsort(tie[rest])]
        order = torch.cat([order[:nz], rest])
    return order[:k]


class FrequencySampler(Sampler[int]):
    """Balanced epochs: all positives + ``neg_per_pos`` x as many negatives, negatives chosen by frequency of use.

    ``labels``: 1 (positive / defective) or 0 (negative) per dataset index. ``frequency=False`` draws the
    negatives uniformly (the papers' ablation). The epoch's list depends only on ``(seed, epoch)`` and the
    draws of earlier epochs, which are replayed when needed, so ``set_epoch`` may jump and resuming is exact.
    Use counts live in the tensor ``freq`` (``state_dict`` / ``load_state_dict``).

    Sharding: leave ``num_replicas=1`` when the DataLoader goes through Accelerate or the shared engine (they
    split batches across processes themselves); set ``num_replicas`` / ``rank`` for a plain DDP loop, where
    each rank then gets an equal strided share of the same global list (padded like ``DistributedSampler``).
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        seed: int = 0,
        frequency: bool = True,
        neg_per_pos: float = 1.0,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
    ) -> None:
        lab = torch.as_tensor(np.asarray(labels)).reshape(-1)
        if lab.numel() == 0:
            raise ValueError("FrequencySampler: no samples")
        bad = ~((lab == 0) | (lab == 1))
        if bad.any():
            raise ValueError(f"FrequencySampler: labels must be 0 or 1, got {lab[bad][:5].tolist()}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"FrequencySampler: need num_replicas >= 1 and 0 <= rank < num_replicas, got "
                             f"{num_replicas}, {rank}")
        if neg_per_pos < 0:
            raise ValueError(f"FrequencySampler: neg_per_pos must be >= 0, got {neg_per_pos}")
        self.pos_idx = torch.nonzero(lab == 1).flatten()
        self.neg_idx = torch.nonzero(lab == 0).flatten()
        if self.pos_idx.numel() == 0:
            raise ValueError("FrequencySampler: the dataset has no positive (defective) samples; "
                             "balanced epochs need at least one")
        self.seed = int(seed)
        self.frequency = bool(frequency)
        self.neg_per_pos = float(neg_per_pos)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        # as many negatives as positives (x neg_per_pos); fewer negatives than that: several passes
        self.num_neg_per_epoch = round(self.neg_per_pos * self.pos_idx.numel()) if self.neg_idx.numel() else 0
        self.freq = torch.zeros(self.neg_idx.numel(), dtype=torch.float64)  # uses of each negative so far
        self._drawn_epoch = -1  # last epoch whose draw is reflected in freq
        self._order = torch.empty(0, dtype=torch.int64)  # global index list of _drawn_epoch

    # ------------------------------------------------------------------ epoch bookkeeping
    @property
    def global_length(self) -> int:
        """Samples per epoch over all ranks."""
        return int(self.pos_idx.numel() + self.num_neg_per_epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose list ``__iter__`` returns."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def _generator(self, epoch: int) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed((self.seed * 1_000_003 + epoch * 7_919 + 0x5E6DEC) % (2**63))
        return g

    def _draw(self, epoch: int) -> torch.Tensor:
        """Draw epoch ``epoch``'s list from the current ``freq`` and update ``freq`` with it."""
        g = self._generator(epoch)
        k = self.num_neg_per_epoch
        chosen: list[torch.Tensor] = []
        n_neg = self.neg_idx.numel()
        while k > 0:  # more negatives wanted than exist: several passes, each without replacement
            take = min(k, n_neg)
            if self.frequency:
                p = frequency_sampling_probs(self.freq)
                sel = _draw_without_replacement(p, take, g)
            else:
                sel = torch.randperm(n_neg, generator=g)[:take]
            self.freq[sel] += 1.0
            chosen.append(sel)
            k -= take
        negs = self.neg_idx[torch.cat(chosen)] if chosen else torch.empty(0, dtype=torch.int64)
        order = torch.cat([self.pos_idx, negs])
        if self.shuffle:
            order = order[torch.randperm(order.numel(), generator=g)]
        return order

    def _ensure(self, epoch: int) -> torch.Tensor:
        if epoch < self._drawn_epoch:  # went back: replay from scratch
            self.freq.zero_()
            self._drawn_epoch = -1
        while self._drawn_epoch < epoch:
            self._order = self._draw(self._drawn_epoch + 1)
            self._drawn_epoch += 1
        return self._order

    def epoch_indices(self, epoch: int | None = None) -> list[int]:
        """The global (unsharded) index list of ``epoch`` (default: the current one)."""
        return self._ensure(self.epoch if epoch is None else int(epoch)).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self._ensure(self.epoch)
        if self.num_replicas > 1:
            per = math.ceil(order.numel() / self.num_replicas)
            pad = per * self.num_replicas - order.numel()
            if pad:
                order = torch.cat([order, order[:pad]])
            order = order[self.rank :: self.num_replicas]
        return iter(order.tolist())

    def __len__(self) -> int:
        if self.num_replicas > 1:
            return math.ceil(self.global_length / self.num_replicas)
        return self.global_length

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that restore the sampler exactly (use counts, last drawn epoch and its list)."""
        return {
            "freq": self.freq.clone(),
            "drawn_epoch": torch.tensor(self._drawn_epoch, dtype=torch.int64),
            "order": self._order.clone(),
            "num_negatives": torch.tensor(self.neg_idx.numel(), dtype=torch.int64),
            "seed": torch.tensor(self.seed, dtype=torch.int64),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict``; raises ValueError if it belongs to a different data set."""
        freq = torch.as_tensor(state["freq"], dtype=torch.float64).reshape(-1)
        if freq.numel() != self.neg_idx.numel():
            raise ValueError(
                f"sampler state has {freq.numel()} negatives, this data set {self.neg_idx.numel()}: "
                "it belongs to a different data set"
            )
        order = torch.as_tensor(state["order"], dtype=torch.int64).reshape(-1)
        drawn = int(torch.as_tensor(state["drawn_epoch"]))
        if drawn >= 0 and order.numel() != self.global_length:
            raise ValueError(f"sampler state lists {order.numel()} samples per epoch, expected {self.global_length}")
        self.freq = freq.clone()
        self._order = order.clone()
        self._drawn_epoch = drawn
