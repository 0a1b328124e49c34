"""Fine-tuning strategies (the ``finetune`` config group).

A strategy gets the pruned model and its masks and returns what to train: ``prepare`` may transform the
model (e.g. expand compact layers) and add a loss term (e.g. distillation from the dense teacher);
``finish`` undoes the transformation (e.g. merges expanded layers) and returns the final model and masks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunelab.pruning.masks import MaskSet

# extra_loss(model, x, y, logits) -> scalar added to the cross-entropy of a training step (e.g. SP-KD)
ExtraLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Prepared:
    model: nn.Module
    masks: MaskSet | None
    extra_loss: ExtraLoss | None = None
    info: dict[str, Any] = field(default_factory=dict)


class Finetune:
    """Plain fine-tuning of the pruned network with its masks enforced."""

    name = "vanilla"

    def __init__(self, epochs: int = 10, optimizer: Mapping[str, Any] | None = None,
                 scheduler: Mapping[str, Any] | None = None, keep_best: bool = False):
        if int(epochs) < 0:
            raise ValueError(f"finetune.epochs must be >= 0, got {epochs}")
        self.epochs = int(epochs)
        self.keep_best = bool(keep_best)  # end with the epoch of best validation accuracy, not the last
        self.optimizer = dict(optimizer or {"name": "sgd", "lr": 0.01, "momentum": 0.9})
        self.scheduler = dict(scheduler or {"name": "cosine"})

    def prepare(self, model: nn.Module, masks: MaskSet | None, teacher: nn.Module | None) -> Prepared:
        return Prepared(model, masks)

    def finish(self, prepared: Prepared) -> tuple[nn.Module, MaskSet | None, dict[str, Any]]:
        return prepared.model, prepared.masks, dict(prepared.info)
