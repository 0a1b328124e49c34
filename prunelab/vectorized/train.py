"""Train the queued training stages of N copies together: one stacked model, one optimiser step per batch.

The step is ``PruneModule.training_step``'s, copy by copy: cross-entropy of the copy's logits ->
zero_grad -> backward -> mask the pruned gradients -> (clip each copy's gradient norm) -> optimiser step ->
re-mask the weights -> LR step; masks are applied once before the first step (``PruneModule.on_fit_start``).
Copy k's batch i of epoch e is the batch the pipeline's Lightning loop would give it: batch i of its own
data module's :class:`~prunelab.data.batched.BatchIndexDataset` at epoch e (its own split, its own
``epoch_permutation(n, seed_k, e)``), through its own ``process_batch`` (conversion and normalisation with
its own statistics), with the number of batches per epoch limited as Lightning's ``limit_train_batches``.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from prunelab.config import stable_hash
from prunelab.data.batched import BatchIndexDataset
from prunelab.vectorized.optim import build
from prunelab.vectorized.stacked import StackedModel

log = logging.getLogger(__name__)


@dataclass
class Request:
    """One copy's training stage, stopped before its fit: what the fit would have trained."""

    ctx: Any            # the copy's RunContext
    module: Any         # the PruneModule the stage built (model at its initial weights, masks, recipe)
    epochs: int
    fingerprint: str    # of everything the stage's result depends on (runner.fingerprint)
    job: int = -1


@dataclass
class Trained:
    """The result of one copy's vectorised stage, replayed when the copy's pipeline reaches that fit."""

    state: dict[str, torch.Tensor]
    time_s: float                       # the group's training wall time / copies (amortised)
    copies: int
    group_time_s: float
    epoch_metrics: list[dict[str, float]] = field(default_factory=list)


def num_batches(length: int, limit: Any) -> int:
    """Batches per epoch as Lightning's ``_parse_num_batches`` for ``trainer.limit_train_batches``
    (``None`` = all; int = at most that many; float = that fraction, rounded down)."""
    if limit is None or length == 0:
        return int(length)
    if isinstance(limit, bool):
        raise ValueError(f"trainer.limit_train_batches={limit!r} must be an int or a float")
    if isinstance(limit, int):
        return min(length, limit)
    n = int(length * float(limit))
    if n == 0 and float(limit) > 0.0:
        raise ValueError(f"trainer.limit_train_batches={limit} x {length} batches < 1")
    return n


def device_of(cfg) -> torch.device:
    """The device a single-device Lightning trainer of ``cfg.trainer`` trains on."""
    acc = str(cfg.trainer.get("accelerator", "auto"))
    if acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", 0)
    return torch.device("cpu")


def train_dataset(ctx) -> tuple[BatchIndexDataset, int]:
    """The copy's training batches (its data module's own dataset, epoch set explicitly rather than read
    from a Lightning trainer) and the number of batches per epoch."""
    ds = ctx.datamodule.train_dataset()
    ds.epoch_fn = None
    return ds, num_batches(len(ds), ctx.cfg.trainer.get("limit_train_batches"))


class EpochBatches:
    """The copies' training batches of one epoch, stacked: ``batch(i)`` is ``(x, y)`` of shape
    ``(N, B, ...)`` / ``(N, B)`` whose row k is copy k's batch i, exactly what its Lightning loop gets
    (``dm.process_batch(*ds_k[i], train=True)``).

    For the standard :class:`~prunelab.data.base.TensorDataModule` processing (conversion and per-channel
    normalisation, element-wise: the result of a sample does not depend on the batch it is processed in),
    ``chunk`` batches are gathered and processed at once per copy and stacked once (a few large operations
    instead of N small ones per step); any other ``process_batch`` is called batch by batch."""

    def __init__(self, reqs: list[Request], data: list[tuple[BatchIndexDataset, int]], device: torch.device,
                 epoch: int, budget_bytes: int = 64 << 20):
        self.reqs, self.data, self.device = reqs, data, device
        for ds, _ in data:
            ds.set_epoch(epoch)
        self.nb = data[0][1]
        self.bs = data[0][0].batch_size
        self.chunked = all(_elementwise_processing(r.ctx.datamodule) for r in reqs)
        sample = int(data[0][0].x[0].numel()) * 4
        self.chunk = max(1, budget_bytes // max(1, len(reqs) * self.bs * sample))
        self._start, self._x, self._y = -1, None, None

    def batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.chunked:
            xs, ys = [], []
            for r, (ds, _) in zip(self.reqs, self.data):
                x, y = ds[i]
                x, y = r.ctx.datamodule.process_batch(x.to(self.device), y.to(self.device), train=True)
                xs.append(x)
                ys.append(y)
            return torch.stack(xs), torch.stack(ys)
        start = i - i % self.chunk
        if start != self._start:
            stop = min(self.nb, start + self.chunk)
            xs, ys = [], []
            for r, (ds, _) in zip(self.reqs, self.data):
                idx = ds.order()[start * self.bs: stop * self.bs]
                x, y = r.ctx.datamodule.process_batch(ds.x[idx].to(self.device), ds.y[idx].to(self.device),
                                                      train=True)
                xs.append(x.view(stop - start, self.bs, *x.shape[1:]))
                ys.append(y.view(stop - start, self.bs))
            # (steps, N, B, ...): the batch of a step is one contiguous block
            self._x = torch.stack(xs, dim=1)
            self._y = torch.stack(ys, dim=1)
            self._start = start
        return self._x[i - start], self._y[i - start]


def _elementwise_processing(dm) -> bool:
    from prunelab.data.base import TensorDataModule

    return (isinstance(dm, TensorDataModule) and type(dm).process_batch is TensorDataModule.process_batch
            and not dm.augment and dm.resized_crop is None)


def group_key(req: Request) -> str:
    """Requests with the same key can be trained as one stacked model: same architecture and input, same
    recipe (so the same learning rate at every step), same number of steps, same batch size, same device."""
    ctx, m = req.ctx, req.module
    ds, nb = train_dataset(ctx)
    shapes = [(n, list(p.shape)) for n, p in m.model.named_parameters()]
    return stable_hash({"model": type(m.model).__qualname__, "shapes": shapes, "input": list(ctx.input_shape),
                        "epochs": req.epochs, "optimizer": m.optimizer_cfg, "scheduler": m.scheduler_cfg,
                        "batches": nb, "batch_size": ds.batch_size, "device": str(device_of(ctx.cfg))}, 16)


def train_group(reqs: list[Request]) -> list[Trained]:
    """Train the requests (one group: same :func:`group_key`) as one stacked model; returns each copy's
    trained weights. The copies' own modules are not modified."""
    start = time.perf_counter()
    first = reqs[0]
    device = device_of(first.ctx.cfg)
    epochs = int(first.epochs)
    if device.type != "cpu":
        for r in reqs:  # what PruneModule.on_fit_start does: data held on the training device
            if hasattr(r.ctx.datamodule, "to_device"):
                r.ctx.datamodule.to_device(device)
    data = [train_dataset(r.ctx) for r in reqs]
    nb = data[0][1]
    if any(n != nb for _, n in data):
        raise ValueError("copies of a group must have the same number of batches per epoch")
    models = [r.module.model for r in reqs]
    stacked = StackedModel([copy.deepcopy(m) for m in models], [r.module.masks for r in reqs], device)
    opt_cfg, sched_cfg = first.module.optimizer_cfg, first.module.scheduler_cfg
    opt, sched = build(stacked.parameters(), opt_cfg, sched_cfg, steps=epochs * nb, epochs=epochs)
    clip = opt_cfg.get("clip_grad_norm")
    n = len(reqs)
    metrics: list[list[dict[str, float]]] = [[] for _ in reqs]
    stacked.apply_masks()
    for epoch in range(epochs):
        batches = EpochBatches(reqs, data, device, epoch)
        sums = torch.zeros(n, 3, device=device)
        for i in range(nb):
            x, y = batches.batch(i)
            logits = stacked.forward(x)
            losses = stacked.losses(logits, y)
            opt.zero_grad(set_to_none=True)
            losses.sum().backward()
            stacked.mask_grads()
            if clip:
                stacked.clip_grad_norm_(float(clip))
            opt.step()
            stacked.apply_masks()
            sched.step()
            with torch.no_grad():
                b = float(y.shape[1])
                sums += torch.stack([losses.detach() * b, (logits.argmax(-1) == y).sum(1).float(),
                                     torch.full_like(losses, b)], dim=1)
        for k, (loss_sum, correct, count) in enumerate(sums.tolist()):
            if count:
                stage = reqs[k].module.stage
                metrics[k].append({f"{stage}/train/loss": loss_sum / count, f"{stage}/train/acc": correct / count,
                                   "epoch": float(epoch), "step": float((epoch + 1) * nb - 1)})
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    log.info("vectorised %s: %d copies x %d epochs x %d steps in %.2f s", first.module.stage, n, epochs, nb, wall)
    return [Trained(stacked.state_dict(k), wall / n, n, wall, metrics[k]) for k in range(n)]

