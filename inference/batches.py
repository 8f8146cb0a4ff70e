"""Mini-batches: row indices in an order that is a function of (seed, epoch) only, and
the rows they index (freshly binarized each epoch under dynamic binarization).

Two loaders give the same batches: :func:`batch_loader`, a ``torch.utils.data.DataLoader``
over :class:`Rows` (the reference), and :class:`InMemoryBatches`, which slices the
in-memory tensor itself (the training driver's loader: the DataLoader's per-batch
machinery cost about 0.1 ms a step, the row gather by advanced indexing and a new random
generator per batch a little more; ``tests/test_perf.py`` checks the batches are equal)."""

from __future__ import annotations

import itertools
import math
from typing import Callable, Iterator

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


class InMemoryBatches:
    """An epoch's mini-batches ``(x_batch, idx)`` sliced from the rows ``x`` (N, D) held in
    memory: the batches of :func:`batch_loader` (the same indices in the same order, the
    same dynamic-binarization draws), without a DataLoader. Lightning takes it as a
    training loader: ``len()`` is the number of batches of an epoch, and its ``sampler``
    (an :class:`EpochBatches`) is told each epoch's number (``set_epoch``), as a
    DataLoader's sampler is.

    Per batch: the rows gathered by ``index_select`` (the values of ``x[idx]``, 13 against
    45 us for 100 MNIST rows) and, with ``dynamic``, one draw u ~ U[0, 1) per entry from a
    generator re-seeded with the batch's key, the rows being (u < x) written into u's own
    storage (``lt_``: one pass, 10 against 120 us for ``(u < x).to(float)``):
    ``models.datasources.bernoulli_draw``'s numbers.
    """

    def __init__(self, x: torch.Tensor, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 dynamic: bool = False, rank: int = 0, world_size: int = 1):
        self.x, self.dynamic = x, dynamic
        self.sampler = EpochBatches(int(x.shape[0]), batch_size, seed=seed, shuffle=shuffle, rank=rank,
                                    world_size=world_size)
        self._generator = torch.Generator()

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # a DataLoader's iterator draws one number from torch's global generator as the
        # epoch starts (its workers' base seed): drawn here too, so that a fit draws the
        # same random numbers (the model's and the guide's) through either loader
        torch.empty((), dtype=torch.int64).random_()
        x, g = self.x, self._generator
        for idx, key in self.sampler:
            rows = torch.index_select(x, 0, idx)  # (B, D)
            if self.dynamic:
                rows = torch.rand(rows.shape, generator=g.manual_seed(key), dtype=rows.dtype).lt_(rows)
            yield rows, idx


class BatchRun:
    """``n`` consecutive mini-batches of an epoch, taken from the epoch's batch iterator
    when iterated: one Lightning batch that carries ``n`` optimizer steps."""

    def __init__(self, source: Iterator, n: int):
        self.source, self.n = source, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator:
        return itertools.islice(self.source, self.n)


class BatchRuns:
    """An epoch of ``batches`` (an :class:`InMemoryBatches`) as runs of ``size``
    consecutive batches (:class:`BatchRun`), the last run of the epoch shorter. In the
    epoch where the step budget ends (``budget()``, called as the epoch starts: the steps
    the fit may still take, None for no limit) a run ends where the budget does, so that
    the fit stops where it would after single batches; with ``single_at_budget`` that
    epoch is one batch a run instead, so that a checkpoint taken where the fit stops
    records its progress in batches, as after single batches (a fit resumed from it
    goes on as before). The batches, their order and their draws are ``batches``'s own;
    ``sampler`` is ``batches``'s.

    It has no ``len()``, on purpose: Lightning then ends the epoch (and validates) when
    the runs are exhausted, not after a number of Lightning batches fixed in advance."""

    def __init__(self, batches: InMemoryBatches, size: int, budget: Callable[[], int | None] = lambda: None,
                 single_at_budget: bool = False):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.batches, self.size, self.budget, self.single_at_budget = batches, size, budget, single_at_budget
        self.sampler = batches.sampler

    def plan(self) -> list[int]:
        """The lengths of this epoch's runs."""
        n, left = len(self.batches), self.budget()
        if left is None or left >= n:
            left = n
        elif self.single_at_budget:
            return [1] * n
        edges = sorted({*range(0, n, self.size), left, n})
        return [b - a for a, b in zip(edges, edges[1:])]

    def __iter__(self) -> Iterator[BatchRun]:
        source = iter(self.batches)
        return iter([BatchRun(source, n) for n in self.plan()])


def batch_loader(x: torch.Tensor, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 dynamic: bool = False, rank: int = 0, world_size: int = 1) -> torch.utils.data.DataLoader:
    """A DataLoader of ``(x_batch, idx)`` with whole-batch indexing (no per-row collate)."""
    sampler = EpochBatches(int(x.shape[0]), batch_size, seed=seed, shuffle=shuffle, rank=rank, world_size=world_size)
    return torch.utils.data.DataLoader(Rows(x, dynamic), sampler=sampler, batch_size=None, num_workers=0)
