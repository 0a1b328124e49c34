"""Data-driven scores under data parallelism (DDP): each rank scores its shard of the score batches and the
per-rank sums are all-reduced, so every rank gets the same scores (hence the same masks) as one process
scoring every batch.

Why this is exact (up to float summation order): SNIP accumulates ``sum_b dL_b/dw`` and GraSP accumulates
``g = sum_b dL_b/dw`` and ``H g = sum_b d<dL_b/dw, g>/dw`` (``g`` reduced first), sums over whole batches.
Sharding *whole batches* (rank r takes batches r, r + W, r + 2W, ...) keeps every per-batch term unchanged,
BatchNorm batch statistics in training mode included; the sum over ranks of the per-rank sums is the full
sum. Ranks that get no batch contribute zeros.

When is it used: only when ``torch.distributed`` is initialised with more than one process at scoring time.
Under Lightning's DDP launcher that is the case after the first ``Trainer.fit``/``test`` of the process (the
process group lives on until exit). Before it (for example the dense model came from the cache and nothing
was fitted yet) the other ranks may not even exist; then every process scores all the batches itself:
the same scores as a single process, deterministically, on every rank. ``PruneModule`` checks the mask
digests across ranks before training in any case.

Under an initialised process group, ``score()`` of a data-driven scorer is a *collective*: every rank must
call it, in the same order (the pipeline's prune stage runs on every rank).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch

T = TypeVar("T")


def score_group() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group when ``torch.distributed`` is initialised with
    more than one process; ``(0, 1)`` otherwise (scoring is then local and covers every batch)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    world = dist.get_world_size()
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """Round-robin share of ``rank`` among ``world`` ranks: items ``rank, rank + world, ...``."""
    return list(items)[rank::world]


def _comm_device(ref: torch.device) -> torch.device:
    """NCCL reduces CUDA tensors only; gloo (CPU) takes CPU tensors."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return ref if ref.type == "cpu" else torch.device("cpu")


def all_reduce_sum_(tensors: Sequence[torch.Tensor]) -> None:
    """Sum ``tensors`` in place over the ranks of the default process group (one flat all-reduce per
    dtype); a no-op without an initialised multi-process group. Every rank gets the same result."""
    _, world = score_group()
    if world == 1 or not tensors:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        device = _comm_device(group[0].device)
        flat = torch.cat([t.detach().reshape(-1).to(device) for t in group])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        offset = 0
        with torch.no_grad():
            for t in group:
                n = t.numel()
                t.copy_(flat[offset : offset + n].view_as(t).to(t.device))
                offset += n
