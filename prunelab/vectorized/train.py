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
    stacked = StackedModel([_detached_copy(m) for m in models], [r.module.masks for r in reqs], device)
    opt_cfg, sched_cfg = first.module.optimizer_cfg, first.module.scheduler_cfg
    opt, sched = build(stacked.parameters(), opt_cfg, sched_cfg, steps=epochs * nb, epochs=epochs)
    clip = opt_cfg.get("clip_grad_norm")
    n = len(reqs)
    metrics: list[list[dict[str, float]]] = [[] for _ in reqs]
    stacked.apply_masks()
    for epoch in range(epochs):
        for ds, _ in data:
            ds.set_epoch(epoch)
        sums = torch.zeros(n, 3, device=device)
        for i in range(nb):
            xs, ys = [], []
            for r, (ds, _) in zip(reqs, data):
                x, y = ds[i]
                x, y = r.ctx.datamodule.process_batch(x.to(device), y.to(device), train=True)
                xs.append(x)
                ys.append(y)
            x, y = torch.stack(xs), torch.stack(ys)
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


def _detached_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model)
