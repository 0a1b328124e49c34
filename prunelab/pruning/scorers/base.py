"""The scorer interface.

``Scorer.score(model, masks, batches) -> {tensor_name: scores}``: one score per weight of every prunable
tensor (higher = more important = kept). Pruned weights may get any score; the allocation treats them as
-inf so masks stay nested. Class attributes declare what a scorer needs:

- ``needs_data``: it consumes ``batches`` (a list of (x, y) tensors from the training split);
- ``rounds``: how many score -> prune iterations it wants (SynFlow: 100), with the exponential schedule
  density_t = density_0 * (density_final / density_0) ** (t / rounds).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from prunelab.pruning.masks import MaskSet

Batch = tuple[torch.Tensor, torch.Tensor]


class Scorer:
    name = "base"
    needs_data: bool = False
    rounds: int = 1

    def score(self, model: nn.Module, masks: MaskSet, batches: Sequence[Batch]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"
