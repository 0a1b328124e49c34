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
from typing import Any, NamedTuple

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


class Chunk(NamedTuple):
    """``k`` consecutive training batches served as one loader item. As served, ``x`` / ``y`` are stacked
    (``k x B x ...`` / ``k x B``); after the data module's batch hook they are tuples of the ``k`` processed
    batches. ``start``: the epoch index of the first batch (batch ``start + j`` is ``(x[j], y[j])``)."""

    x: Any
    y: Any
    start: int


def steps_per_call(requested: int, trainer: Any) -> int:
    """How many batches one Lightning training step takes: ``requested`` when the trained LightningModule
    declares ``takes_chunks = True`` (it runs one optimiser step per batch of a :class:`Chunk`), else 1; and 1
    wherever Lightning itself counts or splits training batches: ``limit_train_batches``, ``max_steps``,
    ``val_check_interval``, ``overfit_batches``, ``fast_dev_run``, gradient accumulation, several processes."""
    k = max(1, int(requested))
    if k == 1 or trainer is None:
        return 1
    try:
        limit, val_every = trainer.limit_train_batches, trainer.val_check_interval
        whole = (getattr(trainer.lightning_module, "takes_chunks", False) is True
                 and isinstance(limit, float) and limit == 1.0 and trainer.max_steps in (-1, None)
                 and isinstance(val_every, float) and val_every == 1.0 and not trainer.overfit_batches
                 and not trainer.fast_dev_run and trainer.accumulate_grad_batches == 1 and trainer.world_size == 1)
    except AttributeError:  # not a Lightning Trainer: one batch per call
        return 1
    return k if whole else 1


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
        chunk: batches per item (a :class:`Chunk` when > 1; needs ``drop_last``: every batch has ``batch_size``).
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
        chunk: int = 1,
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
        if chunk > 1 and not drop_last:
            raise ValueError("chunk > 1 needs drop_last=True (training batches of equal size)")
        self.chunk = max(1, int(chunk))
        self._epoch = 0
        self._perm: Tensor | None = None
        self._perm_epoch: int | None = None

    @property
    def num_batches(self) -> int:
        """Batches per epoch."""
        n = len(self.x)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __len__(self) -> int:
        """Items per epoch: batches, or chunks of ``chunk`` batches (the last one may be shorter)."""
        return math.ceil(self.num_batches / self.chunk)

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

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor] | Chunk:
        if not 0 <= index < len(self):
            raise IndexError(f"batch index {index} out of range [0, {len(self)})")
        if self.chunk > 1:
            first = index * self.chunk
            k = min(self.chunk, self.num_batches - first)
            lo, hi = first * self.batch_size, (first + k) * self.batch_size
            idx = self.order()[lo:hi] if self.shuffle else slice(lo, hi)
            x, y = self.x[idx], self.y[idx]
            return Chunk(x.reshape(k, self.batch_size, *x.shape[1:]), y.reshape(k, self.batch_size), first)
        start = index * self.batch_size
        if self.shuffle:
            idx = self.order()[start : start + self.batch_size]
            return self.x[idx], self.y[idx]
        return self.x[start : start + self.batch_size], self.y[start : start + self.batch_size]


def batch_loader(ds: BatchIndexDataset) -> DataLoader:
    """The ``DataLoader`` for a :class:`BatchIndexDataset`: automatic batching off, sequential batch indices."""
    return DataLoader(ds, batch_size=None, shuffle=False, num_workers=0)
