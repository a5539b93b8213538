"""Seeded data order: the permutation of an epoch depends only on (seed, epoch), so resume is exact."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler


class SeededSampler(Sampler[int]):
    """Random (or sequential) order that depends only on ``(seed, epoch)``; call ``set_epoch`` each epoch."""

    def __init__(self, data_source: Sequence | Dataset, seed: int = 0, shuffle: bool = True):
        self.n = len(data_source)  # type: ignore[arg-type]
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch``."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n
