"""Validation metrics of a training stage, for its record: the best and the last validation accuracy.

A hyper-parameter search must select on validation data (test accuracy is only reported), so every training
stage records ``<stage>/val/acc_best`` (and the epoch it was reached), ``<stage>/val/acc_last`` and
``<stage>/val/loss_last``. The tracker reads the epoch-level values Lightning has reduced (across DDP ranks:
the accuracy is a synced torchmetrics metric, the loss is logged with ``sync_dist``) after each validation
loop, ignores the sanity check, and keeps its state in the stage's checkpoints, so a resumed stage still
knows the best epoch from before the interruption.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl


class ValidationTracker(pl.Callback):
    def __init__(self, stage: str):
        self.stage = stage
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.last: float | None = None
        self.last_loss: float | None = None

    @property
    def state_key(self) -> str:
        return f"ValidationTracker[{self.stage}]"

    def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        acc = metrics.get(f"{self.stage}/val/acc")
        if acc is None:
            return
        loss = metrics.get(f"{self.stage}/val/loss")
        self.record(int(trainer.current_epoch), float(acc), None if loss is None else float(loss))

    def record(self, epoch: int, acc: float, loss: float | None) -> None:
        """One epoch's validation result (the epoch-level accuracy and loss). Also how a training loop other
        than Lightning's (prunelab/vectorized) reports the epochs it validated, in order."""
        self.last = acc
        self.last_loss = loss
        # NaN never becomes the best; ties keep the earlier epoch (as ModelCheckpoint does)
        if not math.isnan(acc) and (self.best is None or acc > self.best):
            self.best, self.best_epoch = acc, int(epoch)

    def metrics(self) -> dict[str, Any]:
        """``<stage>/val/acc_best|best_epoch|acc_last|loss_last``; empty when no validation ran."""
        if self.last is None:
            return {}
        p = f"{self.stage}/val"
        return {f"{p}/acc_best": self.best, f"{p}/best_epoch": self.best_epoch, f"{p}/acc_last": self.last,
                f"{p}/loss_last": self.last_loss}

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "last": self.last, "last_loss": self.last_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch = state.get("best"), state.get("best_epoch")
        self.last, self.last_loss = state.get("last"), state.get("last_loss")
