"""Train the queued training stages of N copies together: one stacked model, one optimiser step per batch.

The step is ``PruneModule.training_step``'s, copy by copy: cross-entropy of the copy's logits ->
zero_grad -> backward -> mask the pruned gradients -> (clip each copy's gradient norm) -> optimiser step ->
re-mask the weights -> LR step; masks are applied once before the first step (``PruneModule.on_fit_start``).
After each epoch's last step every copy is validated as its Lightning loop validates it (:func:`validate`):
its own validation split, ``<stage>/val/acc`` and ``<stage>/val/loss`` reduced the same way; a copy whose
stage keeps its best epoch (``finetune.keep_best``) keeps the weights of that epoch as the stage's
``ModelCheckpoint(monitor=<stage>/val/acc, mode=max, save_top_k=1)`` does (:class:`BestEpoch`).
Copy k's batch i of epoch e is the batch the pipeline's Lightning loop would give it: batch i of its own
data module's :class:`~prunelab.data.batched.BatchIndexDataset` at epoch e (its own split, its own
``epoch_permutation(n, seed_k, e)``), through its own ``process_batch`` (conversion and normalisation with
its own statistics), with the number of batches per epoch limited as Lightning's ``limit_train_batches``.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from prunelab.config import stable_hash
from prunelab.data.batched import BatchIndexDataset
from prunelab.vectorized.optim import build
from prunelab.vectorized.stacked import StackedModel

log = logging.getLogger(__name__)


def stacked_batch(reqs, data, i: int, device, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``i`` of every copy, processed by the copy's own data module (normalisation, augmentation when
    ``train``), stacked along a new leading copy dimension."""
    xs, ys = [], []
    for r, (ds, _) in zip(reqs, data):
        x, y = ds[i]
        x, y = r.ctx.datamodule.process_batch(x.to(device), y.to(device), train=train)
        xs.append(x)
        ys.append(y)
    return torch.stack(xs), torch.stack(ys)


@dataclass
class Request:
    """One copy's training stage, stopped before its fit: what the fit would have trained."""

    ctx: Any            # the copy's RunContext
    module: Any         # the PruneModule the stage built (model at its initial weights, masks, recipe)
    epochs: int
    fingerprint: str    # of everything the stage's result depends on (runner.fingerprint)
    job: int = -1
    keep_best: bool = False  # the stage keeps the weights of its best validation epoch (finetune.keep_best)


@dataclass
class Trained:
    """The result of one copy's vectorised stage, replayed when the copy's pipeline reaches that fit."""

    state: dict[str, torch.Tensor]
    time_s: float                       # the group's training wall time / copies (amortised)
    copies: int
    group_time_s: float
    epoch_metrics: list[dict[str, float]] = field(default_factory=list)
    # (validation accuracy, validation loss) after each epoch, as the Lightning loop reduces them; empty when
    # no validation ran (trainer.limit_val_batches=0)
    val: list[tuple[float, float]] = field(default_factory=list)
    best: BestEpoch | None = None       # the kept best epoch (Request.keep_best and validation ran)


@dataclass
class BestEpoch:
    """The epoch ``ModelCheckpoint(monitor=<stage>/val/acc, mode="max", save_top_k=1)`` keeps: the first
    validated epoch, then any epoch whose accuracy is strictly greater (``torch.gt``: a tie keeps the earlier
    epoch, a NaN never replaces); a NaN score is kept as ``-inf`` (``ModelCheckpoint._update_best_and_save``).
    ``state``: the copy's weights after that epoch."""

    epoch: int
    score: float
    state: dict[str, torch.Tensor]

    def better(self, acc: float) -> bool:
        return acc > self.score  # False for NaN, as torch.gt

    @staticmethod
    def score_of(acc: float) -> float:
        return float("-inf") if math.isnan(acc) else acc


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
            return stacked_batch(self.reqs, self.data, i, self.device, train=True)
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


def val_dataset(ctx) -> tuple[BatchIndexDataset, int]:
    """The copy's validation batches: the dataset of its data module's own ``val_dataloader`` (the
    validation split, or the test split when there is none; ``eval_batch_size``, natural order, last
    partial batch kept) and the number of batches per validation as ``trainer.limit_val_batches``."""
    ds = ctx.datamodule.val_dataloader().dataset
    return ds, num_batches(len(ds), ctx.cfg.trainer.get("limit_val_batches"))


class ValBatches:
    """The copies' validation batches, stacked: batch i is ``(x, y)`` of shape ``(N, B_i, ...)`` /
    ``(N, B_i)`` whose row k is copy k's batch i as its Lightning validation loop gets it
    (``dm.process_batch(*ds_k[i], train=False)``). The validation data do not change between epochs, so the
    processed batches are built once and kept when they fit ``budget_bytes`` (else rebuilt per validation).
    Copies of a group have validation splits of one size (:func:`group_key`), so the batches stack."""

    def __init__(self, reqs: list[Request], data: list[tuple[BatchIndexDataset, int]], device: torch.device,
                 budget_bytes: int = 256 << 20):
        self.reqs, self.data, self.device = reqs, data, device
        self.nb = data[0][1]
        ds = data[0][0]
        size = min(self.nb * ds.batch_size, len(ds.x)) * int(ds.x[0].numel()) * 4 * len(reqs)
        self._kept = list(self._build()) if size <= budget_bytes else None

    def _build(self):
        for i in range(self.nb):
            yield stacked_batch(self.reqs, self.data, i, self.device, train=False)

    def __iter__(self):
        return iter(self._kept) if self._kept is not None else self._build()


@torch.no_grad()
def validate(stacked: StackedModel, batches: ValBatches) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-copy ``(acc, loss)``, float32 ``(N,)``, reduced as the Lightning validation loop reduces what
    ``PruneModule._eval_step`` logs: ``<stage>/val/acc`` is torchmetrics' micro ``MulticlassAccuracy``
    (correct predictions, argmax, counted as integers over all batches, then a float32 division by the
    number of samples); ``<stage>/val/loss`` is ``self.log``'s mean weighted by ``batch_size``: the float32
    sum of ``loss_i * B_i`` accumulated batch by batch, divided by the number of samples. Each element of the
    ``(N,)`` vectors goes through exactly the scalar operations of copy k's loop. The models have no
    dropout or batch statistics (:func:`~prunelab.vectorized.stacked.unsupported_model`), so eval mode
    changes nothing."""
    n = stacked.n
    dev = next(iter(stacked.params.values())).device
    loss_sum = torch.zeros(n, dtype=torch.float32, device=dev)
    correct = torch.zeros(n, dtype=torch.int64, device=dev)
    count = 0
    for x, y in batches:
        logits = stacked.forward(x)
        loss_sum = loss_sum + stacked.losses(logits, y) * int(y.shape[1])
        correct += (logits.argmax(-1) == y).sum(1)
        count += int(y.shape[1])
    total = torch.tensor(count, device=dev)
    return correct.float() / total.float(), loss_sum / total


def _elementwise_processing(dm) -> bool:
    from prunelab.data.base import TensorDataModule

    return (isinstance(dm, TensorDataModule) and type(dm).process_batch is TensorDataModule.process_batch
            and not dm.augment and dm.resized_crop is None)


def group_key(req: Request) -> str:
    """Requests with the same key can be trained as one stacked model: same architecture and input, same
    recipe (so the same learning rate at every step), same number of steps, same batch size, same device."""
    ctx, m = req.ctx, req.module
    ds, nb = train_dataset(ctx)
    val, nb_val = val_dataset(ctx)
    shapes = [(n, list(p.shape)) for n, p in m.model.named_parameters()]
    return stable_hash({"model": type(m.model).__qualname__, "shapes": shapes, "input": list(ctx.input_shape),
                        "epochs": req.epochs, "optimizer": m.optimizer_cfg, "scheduler": m.scheduler_cfg,
                        "batches": nb, "batch_size": ds.batch_size, "device": str(device_of(ctx.cfg)),
                        "val": [len(val), val.batch_size, len(val.x), nb_val]}, 16)


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
    val_data = [val_dataset(r.ctx) for r in reqs]
    if len({(len(ds.x), ds.batch_size, n) for ds, n in val_data}) != 1:
        raise ValueError("copies of a group must have validation splits of one size")
    val_batches = ValBatches(reqs, val_data, device) if val_data[0][1] else None
    models = [r.module.model for r in reqs]
    stacked = StackedModel([copy.deepcopy(m) for m in models], [r.module.masks for r in reqs], device)
    opt_cfg, sched_cfg = first.module.optimizer_cfg, first.module.scheduler_cfg
    opt, sched = build(stacked.parameters(), opt_cfg, sched_cfg, steps=epochs * nb, epochs=epochs)
    clip = opt_cfg.get("clip_grad_norm")
    n = len(reqs)
    metrics: list[list[dict[str, float]]] = [[] for _ in reqs]
    vals: list[list[tuple[float, float]]] = [[] for _ in reqs]
    best: list[BestEpoch | None] = [None for _ in reqs]
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
        accs = losses_val = None
        if val_batches is not None:
            acc_t, loss_t = validate(stacked, val_batches)
            accs, losses_val = acc_t.tolist(), loss_t.tolist()
        for k, (loss_sum, correct, count) in enumerate(sums.tolist()):
            stage = reqs[k].module.stage
            row = {"epoch": float(epoch), "step": float((epoch + 1) * nb - 1)}
            if count:
                row.update({f"{stage}/train/loss": loss_sum / count, f"{stage}/train/acc": correct / count})
            if accs is not None:
                acc = accs[k]
                row.update({f"{stage}/val/acc": acc, f"{stage}/val/loss": losses_val[k]})
                vals[k].append((acc, losses_val[k]))
                if reqs[k].keep_best and (best[k] is None or best[k].better(acc)):
                    best[k] = BestEpoch(epoch, BestEpoch.score_of(acc), stacked.state_dict(k))
            if len(row) > 2:
                metrics[k].append(row)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    log.info("vectorised %s: %d copies x %d epochs x %d steps in %.2f s", first.module.stage, n, epochs, nb, wall)
    return [Trained(stacked.state_dict(k), wall / n, n, wall, metrics[k], vals[k], best[k]) for k in range(n)]

