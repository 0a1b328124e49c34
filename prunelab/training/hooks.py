"""Training hooks: how a method that prunes *during* training (iterative Taylor, BMRS, DLLP) plugs into the
one training loop (:class:`prunelab.pipeline.module.PruneModule`).

Every method is one :class:`TrainHook` subclass; each callback has a no-op default, so a hook overrides only
what its method needs. The order within a training step is::

    loss, logits = hook.loss(module, x, y)        # default: cross-entropy of model(x)
    zero_grad; backward(loss)
    hook.after_backward(module, batch_idx)          # read gradients (Taylor scores, SVGD direction)
    mask grads; clip; optimiser step; re-mask
    hook.after_step(module, batch_idx)              # prune on schedule, step the hook's own optimisers

plus ``hook.param_groups`` (how the model's parameters are split into optimiser groups, e.g. noise
parameters without weight decay), ``hook.eval_logits`` (validation/test forward), ``hook.on_epoch_end``
(metrics to log; BMRS recomputes its masks there) and ``hook.should_stop`` (stop the stage early once the
pruning target is reached). ``state_dict``/``load_state_dict`` travel in the Lightning checkpoint, so an
interrupted stage resumes with the hook's state (scores, particles' optimiser, masks).

Under DDP the hook runs on every rank; a hook that derives masks from data must reduce what it reads across
ranks (``module.all_reduce_mean``) so that every rank prunes the same units, and may verify it with
``module.check_ranks_agree(masks_checksum(...), what)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class TrainHook:
    def loss(self, module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(training loss, logits ``(B, C)`` for the running accuracy)."""
        logits = module.model(x)
        return F.cross_entropy(logits, y), logits

    def eval_logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model(x)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]] | None:
        """Optimiser parameter groups (``None``: every trainable parameter in one group)."""
        return None

    def on_train_start(self, module) -> None:
        pass

    def after_backward(self, module, batch_idx: int) -> None:
        pass

    def after_step(self, module, batch_idx: int) -> None:
        pass

    def on_epoch_end(self, module) -> dict[str, float]:
        return {}

    def should_stop(self) -> bool:
        return False

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def masks_checksum(masks: Iterable[torch.Tensor]) -> torch.Tensor:
    """An exact (integer-valued float64) checksum of a sequence of bool unit masks: which units each kept."""
    total = 0
    for i, m in enumerate(masks):
        m = m.flatten().bool()
        total += (i + 1) * (int(m.nonzero().sum()) + int(m.sum()))
    return torch.tensor(float(total), dtype=torch.float64)
