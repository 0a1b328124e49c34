"""FLOPs with ``torch.utils.flop_counter`` (one forward at batch 1; a multiply-add counts as 2 FLOPs, as
FlopCounterMode counts). For unstructured masks each prunable layer's FLOPs are scaled by its density."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def flops_by_module(model: nn.Module, input_shape: Sequence[int]) -> tuple[int, dict[str, int]]:
    """Total FLOPs of one forward pass at batch 1 and the FLOPs of every named module (inclusive)."""
    was_training = model.training
    model.eval()
    p = next(model.parameters())
    x = torch.zeros(1, *input_shape, device=p.device, dtype=p.dtype)
    counter = FlopCounterMode(display=False, depth=None)
    try:
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    prefix = type(model).__name__ + "."
    per_module = {
        k[len(prefix):]: int(sum(v.values())) for k, v in counter.get_flop_counts().items() if k.startswith(prefix)
    }
    return int(counter.get_total_flops()), per_module


def masked_flops(
    model: nn.Module, input_shape: Sequence[int], masks: Mapping[str, torch.Tensor] | None = None
) -> dict[str, int]:
    """``flops_dense`` and ``flops_remaining``: each masked layer's FLOPs times its density."""
    total, per_module = flops_by_module(model, input_shape)
    removed = 0.0
    for name, mask in (masks or {}).items():
        module_name = name.rsplit(".", 1)[0] if "." in name else ""
        layer = per_module.get(module_name, 0)
        removed += layer * (1.0 - float(mask.float().mean()))
    return {"flops_dense": total, "flops_remaining": int(round(total - removed))}

