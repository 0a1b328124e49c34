"""The optimiser step of N stacked copies: the pipeline's own optimiser and LR schedule, applied to the
stacked tensors.

Why this is each copy's own step: SGD (momentum, dampening, weight decay, Nesterov), Adam and AdamW update
every element from that element's parameter, gradient and state and from scalars shared by all elements
(the learning rate, the betas, the step count of the bias correction); nothing couples two elements (no
norm, no per-tensor statistic). So the update of the stacked ``(N, *shape)`` tensor is, element for
element, the update each copy's optimiser would make on its ``shape`` tensor, provided every copy has the
same learning rate at every step. That holds because a group shares the recipe (optimiser and scheduler
config) and the number of steps per epoch, and the schedule is a function of the step count only
(:func:`prunelab.pipeline.optim.build_scheduler`). Building both with the pipeline's functions keeps the
semantics in step when they change; gradient clipping, the one per-model (norm) operation, is done per
copy by :meth:`StackedModel.clip_grad_norm_`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from prunelab.pipeline.optim import build_optimizer, build_scheduler


def scheduler_config(cfg: Mapping[str, Any], steps: int, epochs: int) -> dict[str, Any]:
    """The scheduler config with ``warmup_epochs`` turned into ``warmup_steps`` exactly as
    ``PruneModule.configure_optimizers`` does (``steps * warmup_epochs // epochs``)."""
    out = dict(cfg)
    warm_epochs = int(out.get("warmup_epochs", 0))
    if warm_epochs and epochs:
        out["warmup_steps"] = steps * warm_epochs // max(1, epochs)
    return out


def build(params: list[torch.Tensor], optimizer: Mapping[str, Any], scheduler: Mapping[str, Any],
          steps: int, epochs: int):
    """(optimiser, per-step LR scheduler) over the stacked parameters; ``steps``: the stage's total steps
    (Lightning's ``estimated_stepping_batches``: epochs x batches per epoch)."""
    opt = build_optimizer(params, optimizer)
    return opt, build_scheduler(opt, scheduler_config(scheduler, steps, epochs), steps)
