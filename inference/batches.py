"""Mini-batches: row indices in an order that is a function of (seed, epoch) only, and
the rows they index (freshly binarized each epoch under dynamic binarization)."""

from __future__ import annotations

import math
from typing import Iterator

import torch

from elbolab.models.datasources import bernoulli_draw
from elbolab.models.errors import DataError


def _batch_key(seed: int, epoch: int, rank: int, batch: int) -> int:
    h = seed
    for v in (epoch, rank, batch):
        h = (h * 1_000_003 + v + 1) % (2**63 - 1)
    return h


class EpochBatches(torch.utils.data.Sampler):
    """Yields ``(row_indices, key)`` per mini-batch; the order depends only on
    (seed, epoch), so a resumed run sees the same batches as an uninterrupted one.

    With ``world_size > 1`` each rank takes every ``world_size``-th row of the
    shuffled order (padded by repetition so that every rank has the same number of
    batches), and the indices it yields are global row indices.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _rows(self) -> torch.Tensor:
        if self.shuffle:
            g = torch.Generator().manual_seed(_batch_key(self.seed, self.epoch, 0, 0))
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        if self.world_size > 1:
            total = math.ceil(self.n / self.world_size) * self.world_size
            if total > self.n:
                order = torch.cat([order, order[: total - self.n]])
            order = order[self.rank :: self.world_size]
        return order

    def __len__(self) -> int:
        per_rank = math.ceil(self.n / self.world_size)
        return math.ceil(per_rank / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        rows = self._rows()
        for b, start in enumerate(range(0, len(rows), self.batch_size)):
            yield rows[start : start + self.batch_size], _batch_key(self.seed, self.epoch, self.rank, b + 1)


class Rows(torch.utils.data.Dataset):
    """``rows[(idx, key)] -> (x[idx], idx)``; with ``dynamic`` the rows are a fresh
    Bernoulli draw of the grey levels, seeded by the batch key."""

    def __init__(self, x: torch.Tensor, dynamic: bool = False):
        self.x, self.dynamic = x, dynamic

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, item):
        idx, key = item
        rows = self.x[idx]
        if self.dynamic:
            rows = bernoulli_draw(rows, key)
        return rows, idx


def batch_loader(x: torch.Tensor, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 dynamic: bool = False, rank: int = 0, world_size: int = 1) -> torch.utils.data.DataLoader:
    """A DataLoader of ``(x_batch, idx)`` with whole-batch indexing (no per-row collate)."""
    sampler = EpochBatches(int(x.shape[0]), batch_size, seed=seed, shuffle=shuffle, rank=rank, world_size=world_size)
    return torch.utils.data.DataLoader(Rows(x, dynamic), sampler=sampler, batch_size=None, num_workers=0)
