"""Tensor-held datasets served in whole batches (no per-sample collation).

A :class:`BatchIndexDataset` is a map-style dataset whose item ``i`` is *batch* ``i``: ``(x[idx], y[idx])`` with
``idx`` the ``i``-th slice of a per-epoch permutation. It is used with
``DataLoader(ds, batch_size=None, shuffle=False, num_workers=0)``: the loader's (sequential) sampler yields batch
indices, so under DDP Lightning's ``DistributedSampler`` hands each rank a disjoint subset of *batches* of the same
epoch permutation, i.e. disjoint subsets of samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

_MIX = 1_000_003  # odd multiplier mixing (seed, epoch) into one generator seed


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed that is a deterministic function of ``(seed, epoch)``."""
    return (int(seed) * _MIX + int(epoch) * 7919 + 12345) % (2**63 - 1)


def epoch_permutation(n: int, seed: int, epoch: int, device: torch.device | str | None = None) -> Tensor:
    """The permutation of ``range(n)`` used for ``epoch`` (a pure function of ``(n, seed, epoch)``).

    Computed on the CPU (so the order does not depend on the device) and then moved to ``device``.
    """
    gen = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    perm = torch.randperm(n, generator=gen)
    return perm if device is None else perm.to(device)


class BatchIndexDataset(Dataset[tuple[Tensor, Tensor]]):
    """Map-style dataset over in-memory tensors whose item ``i`` is the ``i``-th batch of an epoch.

    Args:
        x: inputs, first dimension = samples (any dtype, any device; kept as is, e.g. uint8).
        y: labels, ``len(y) == len(x)``.
        batch_size: samples per batch.
        shuffle: if True, each epoch uses :func:`epoch_permutation` ``(len(x), seed, epoch)``; otherwise the
            natural order.
        drop_last: drop the last partial batch (training semantics); otherwise keep it (evaluation).
        seed: base seed of the shuffling.
        epoch_fn: optional callable returning the current epoch; when given it is consulted at every item so the
            order follows e.g. ``trainer.current_epoch`` without an explicit :meth:`set_epoch`.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        *,
        shuffle: bool,
        drop_last: bool,
        seed: int = 0,
        epoch_fn: Callable[[], int] | None = None,
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"x and y have different lengths: {len(x)} vs {len(y)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.x = x
        self.y = y
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = int(seed)
        self.epoch_fn = epoch_fn
        self._epoch = 0
        self._perm: Tensor | None = None
        self._perm_epoch: int | None = None

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    @property
    def epoch(self) -> int:
        """The epoch whose order is served (``epoch_fn()`` when given, else the last :meth:`set_epoch`)."""
        return int(self.epoch_fn()) if self.epoch_fn is not None else self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation is served (ignored when ``epoch_fn`` is given)."""
        self._epoch = int(epoch)

    def order(self) -> Tensor:
        """Sample order of the current epoch (a permutation of ``range(len(x))``, on ``x``'s device)."""
        if not self.shuffle:
            return torch.arange(len(self.x), device=self.x.device)
        epoch = self.epoch
        if self._perm is None or self._perm_epoch != epoch or self._perm.device != self.x.device:
            self._perm = epoch_permutation(len(self.x), self.seed, epoch, self.x.device)
            self._perm_epoch = epoch
        return self._perm

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"batch index {index} out of range [0, {len(self)})")
        start = index * self.batch_size
        if self.shuffle:
            idx = self.order()[start : start + self.batch_size]
            return self.x[idx], self.y[idx]
        return self.x[start : start + self.batch_size], self.y[start : start + self.batch_size]


def batch_loader(ds: BatchIndexDataset) -> DataLoader:
    """The ``DataLoader`` for a :class:`BatchIndexDataset`: automatic batching off, sequential batch indices."""
    return DataLoader(ds, batch_size=None, shuffle=False, num_workers=0)
