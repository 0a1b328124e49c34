"""The LightningModule that trains every stage: a classifier plus (optionally) a :class:`MaskSet`.

Pruned weights stay exactly zero: gradients of pruned weights are zeroed before the optimiser step and the
weights re-masked after it (two fused ``_foreach_mul_`` calls per step, no Python loop over parameters).
The step uses Lightning's manual optimisation (see ``training_step``). A training batch that is a
:class:`~prunelab.data.batched.Chunk` (``data.steps_per_call``) is ``k`` batches: ``k`` steps in order, each exactly
the step of a single batch with its own index in the epoch, and Lightning's logging step advanced by ``k``, so the
optimiser, the LR schedule, the hooks and the logs see the run a one-batch-per-call run is.
Metrics are logged with the stage as prefix: ``pretrain/train/loss``, ``finetune/val/acc``, ...

A diverged stage stops with :class:`~prunelab.utils.finite.NonFiniteError` naming the options to change: the
running loss sum the step already keeps on the device is checked every ``log_every_n_steps`` steps (the steps
that log the loss anyway; no extra per-step work or host sync) and at the end of every epoch, before the epoch
checkpoint is written. Under DDP the check is all-reduced, so every rank stops together.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from prunelab.data.batched import Chunk
from prunelab.finetune.base import ExtraLoss
from prunelab.pipeline.optim import build_optimizer, build_scheduler
from prunelab.pruning.effective import effective_sparsity_report
from prunelab.pruning.masks import MaskSet
from prunelab.training import accel as speed
from prunelab.training.hooks import TrainHook
from prunelab.utils.finite import NonFiniteError, optimizer_advice


class PruneModule(pl.LightningModule):
    takes_chunks = True  # a Chunk batch (data.steps_per_call) is k optimiser steps (training_step)

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any],
        stage: str = "pretrain",
        masks: MaskSet | None = None,
        extra_loss: ExtraLoss | None = None,
        hook: TrainHook | None = None,
        options: str = "the optimizer",
        accel: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.model = model
        self.stage = stage
        self.masks = masks
        self.optimizer_cfg = dict(optimizer)
        self.scheduler_cfg = dict(scheduler)
        self.extra_loss = extra_loss
        self.hook = hook or TrainHook()
        self.mask_sync: dict | None = None
        self.options = options  # the config options of this stage's optimiser, named when training diverges
        self.accel = dict(accel or {})  # prunelab.training.accel: channels_last, compile
        self.channels_last = bool(self.accel.get("channels_last"))
        self.automatic_optimization = False
        self._train_sums = torch.zeros(2)  # loss sum, correct predictions
        self._train_count = 0
        self._extra_sum = torch.zeros(())
        self._step_logged: dict[str, torch.Tensor] = {}  # the latest step-level values given to self.log
        self._total_steps: tuple[Any, int] | None = None  # (trainer, optimiser steps of its fit)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    # steps --------------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        if not isinstance(batch, Chunk):
            self.train_one(batch, batch_idx)
            return
        # Lightning counts one batch per call: its logging step (the loggers' x-axis, what log_every_n_steps
        # counts) is advanced here for every batch but the last, and the step-level row Lightning writes after a
        # batch whose step completes log_every_n_steps is written here for those batches, as a one-batch-per-
        # call run writes it; Lightning itself handles the last batch of the call.
        loop, every = self.trainer.fit_loop.epoch_loop, int(self.trainer.log_every_n_steps or 0)
        for j in range(len(batch.x)):
            self.train_one((batch.x[j], batch.y[j]), batch.start + j)
            if j == len(batch.x) - 1 or self.trainer.should_stop:
                break
            if every and (loop._batches_that_stepped + 1) % every == 0 and self._step_logged:
                self.trainer._logger_connector.log_metrics(dict(self._step_logged))
            loop._batches_that_stepped += 1

    def train_one(self, batch, batch_idx):
        """One optimiser step on one batch (``batch_idx``: its index in the epoch)."""
        # Manual optimisation: the step is exactly zero_grad -> backward -> mask grads -> step -> mask weights
        # -> lr step, without the closure and hook machinery of automatic optimisation (a large share of the
        # step time for small models). Lightning still runs the loops, DDP, precision, logging, checkpoints.
        opt = self.optimizers()
        sched = self.lr_schedulers()
        x, y = batch
        if self.channels_last:
            x = speed.channels_last_input(x)
        loss, logits = self.hook.loss(self, x, y)
        if self.extra_loss is not None:
            extra = self.extra_loss(self.model, x, y, logits)
            self._extra_sum = self._extra_sum + extra.detach() * len(y)
            loss = loss + extra
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self.hook.after_backward(self, batch_idx)
        if self.masks is not None:
            self.masks.mask_grads(self.model)
        clip = self.optimizer_cfg.get("clip_grad_norm")
        if clip:
            self.clip_gradients(opt, gradient_clip_val=float(clip), gradient_clip_algorithm="norm")
        opt.step()
        if self.masks is not None:
            self.masks.apply(self.model)
        if sched is not None:
            sched.step()
        self.hook.after_step(self, batch_idx)
        if self.hook.should_stop():
            self.trainer.should_stop = True
        # Training loss/accuracy are accumulated on the device (no sync, no host-to-device copy, no logging
        # machinery; the sample count on the host) and logged once per epoch; the step loss goes to the logger
        # every log_every_n_steps.
        with torch.no_grad():
            self._train_sums += torch.stack([loss.detach() * len(y), (logits.argmax(1) == y).sum().float()])
        self._train_count += len(y)
        if batch_idx % max(1, self.trainer.log_every_n_steps) == 0:
            self.check_finite_loss()
            self._step_logged[f"{self.stage}/train/loss_step"] = loss.detach()
            self.log(f"{self.stage}/train/loss_step", loss.detach(), on_step=True, on_epoch=False, prog_bar=True)

    def on_train_epoch_start(self) -> None:
        self._train_sums = torch.zeros(2, device=self.device)
        self._train_count = 0
        self._extra_sum = torch.zeros((), device=self.device)

    def check_finite_loss(self) -> None:
        """Raise :class:`NonFiniteError` when a training loss of this epoch was NaN/Inf (on any rank)."""
        bad = (~torch.isfinite(self._train_sums[0])).float()
        if self.trainer is not None and self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        if float(bad) > 0:
            lr = self.optimizer_cfg.get("lr")
            raise NonFiniteError(
                f"{self.stage}: the training loss became non-finite (NaN/Inf) in epoch {self.current_epoch} "
                f"(by step {self.global_step}): training diverged; nothing was recorded or cached. "
                + optimizer_advice(self.options, lr))

    def on_train_epoch_end(self) -> None:
        self.check_finite_loss()  # before the hooks (they may prune from the weights) and the epoch checkpoint
        for key, value in self.hook.on_epoch_end(self).items():
            self.log(f"{self.stage}/{key}", float(value))
        self.log_effective_sparsity()
        loss_sum, correct = self._train_sums.tolist()
        count = self._train_count
        if count:
            self.log(f"{self.stage}/train/loss", loss_sum / count, sync_dist=True)
            self.log(f"{self.stage}/train/acc", correct / count, sync_dist=True)
            if self.extra_loss is not None:
                self.log(f"{self.stage}/train/extra_loss", float(self._extra_sum) / count, sync_dist=True)

    def log_effective_sparsity(self) -> None:
        """``<stage>/sparsity/effective``, ``<stage>/compression/effective`` and ``<stage>/layer_collapse`` of the
        masks as they stand at the end of each training epoch (one forward and one backward of the linearised
        network: about a batch-1 step). A collapsed network logs compression ``inf``, not nothing."""
        dm = getattr(self.trainer, "datamodule", None)
        if self.masks is None or dm is None or not hasattr(dm, "input_shape"):
            return
        if not set(self.masks).issubset(dict(self.model.named_parameters())):
            return  # a transformed model (over-parameterized blocks): measured after the merge, by the stage
        report = effective_sparsity_report(self.model, self.masks, tuple(dm.input_shape))
        self.log(f"{self.stage}/sparsity/effective", float(report["sparsity_effective"]))
        self.log(f"{self.stage}/compression/effective", float(report["compression_effective"]))
        self.log(f"{self.stage}/layer_collapse", float(report["layer_collapse"]))

    def _eval_step(self, batch, split: str, metric: MulticlassAccuracy):
        x, y = batch
        if self.channels_last:
            x = speed.channels_last_input(x)
        logits = self.hook.eval_logits(self.model, x)
        loss = F.cross_entropy(logits, y)
        metric(logits, y)
        self.log(f"{self.stage}/{split}/loss", loss, on_epoch=True, sync_dist=True, batch_size=len(y))
        self.log(f"{self.stage}/{split}/acc", metric, on_epoch=True, prog_bar=split == "val", batch_size=len(y))

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test", self.test_acc)

    # masks --------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and self.device.type != "cpu" and hasattr(dm, "to_device"):
            dm.to_device(self.device)
        if self.masks is not None:
            self.masks.to(self.device)
            if self.trainer.world_size > 1:
                self._sync_masks()
            self.masks.apply(self.model)
        speed.prepare(self.model, self.accel)

    def on_train_start(self) -> None:
        self.hook.on_train_start(self)

    def on_fit_end(self) -> None:
        speed.release(self.model)  # a fit that raises is released by its caller (RunContext.fit)

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Mean of ``tensor`` over DDP ranks (identity in a single process): what hooks use so that every
        rank derives the same masks from its own share of the data."""
        if self.trainer is None or self.trainer.world_size <= 1:
            return tensor
        return self.trainer.strategy.reduce(tensor, reduce_op="mean")

    def check_ranks_agree(self, signature: torch.Tensor, what: str) -> bool:
        """Raise when ``signature`` (a checksum of state every rank must hold identically: masks, particles)
        differs across DDP ranks; True otherwise (and in a single process). Compared exactly, all-gathered."""
        if self.trainer is None or self.trainer.world_size <= 1:
            return True
        sig = signature.detach().to(device=self.device, dtype=torch.float64).reshape(1)
        gathered = self.trainer.strategy.all_gather(sig).flatten()
        if not bool((gathered == gathered[0]).all()):
            raise RuntimeError(f"{what} differ across DDP ranks: {gathered.tolist()}")
        return True

    def _sync_masks(self) -> None:
        """Masks must be identical on every rank: compare digests, and broadcast rank 0's on a mismatch."""
        digest = torch.tensor([self.masks.digest()], device=self.device)
        gathered = self.trainer.strategy.all_gather(digest).flatten().tolist()
        identical = all(d == gathered[0] for d in gathered)
        if not identical:
            state = self.trainer.strategy.broadcast(self.masks.state_dict(), src=0)
            self.masks = MaskSet.from_state_dict(state).to(self.device)
        self.mask_sync = {"world_size": self.trainer.world_size, "digests": gathered,
                          "identical_before_sync": identical}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.masks is not None:
            checkpoint["prunelab_masks"] = self.masks.state_dict()
        checkpoint["prunelab_hook"] = self.hook.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "prunelab_masks" in checkpoint:
            self.masks = MaskSet.from_state_dict(checkpoint["prunelab_masks"]).to(self.device)
        if checkpoint.get("prunelab_hook"):
            self.hook.load_state_dict(checkpoint["prunelab_hook"])

    # optimisation -------------------------------------------------------------------------------------
    def total_steps(self) -> int:
        """Optimiser steps of this fit: Lightning's ``estimated_stepping_batches`` counts calls, and a call takes
        ``steps_per_call`` batches (only for whole epochs: no batch limits or max_steps, see
        :func:`~prunelab.data.batched.steps_per_call`). Computed once per fit (hooks read it every step)."""
        if self._total_steps is None or self._total_steps[0] is not self.trainer:
            self._total_steps = (self.trainer, self._count_steps())
        return self._total_steps[1]

    def _count_steps(self) -> int:
        calls = int(self.trainer.estimated_stepping_batches)
        ds = getattr(self.trainer.train_dataloader, "dataset", None)
        if getattr(ds, "chunk", 1) <= 1:
            return calls
        return calls // len(ds) * ds.num_batches

    def configure_optimizers(self):
        params = self.hook.param_groups(self.model)
        if params is None:
            params = [p for p in self.model.parameters() if p.requires_grad]
        opt = build_optimizer(params, self.optimizer_cfg)
        steps = self.total_steps()
        sched_cfg = dict(self.scheduler_cfg)
        warm_epochs = int(sched_cfg.get("warmup_epochs", 0))
        if warm_epochs and self.trainer.max_epochs:
            sched_cfg["warmup_steps"] = steps * warm_epochs // max(1, self.trainer.max_epochs)
        sched = build_scheduler(opt, sched_cfg, steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
