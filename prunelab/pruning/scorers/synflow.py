"""SynFlow: Iterative Synaptic Flow Pruning (Tanaka, Kunin, Yamins & Ganguli, NeurIPS 2020).

Data-free. With every parameter replaced by its absolute value, the network evaluated on the all-ones input
gives the synaptic flow ``R = 1^T (prod_l |W_l|) 1`` (paper, Eq. 2, in general ``R = sum of the outputs``) and
the score of a weight is ``S(w) = dR/dw ⊙ w`` (positive: ``dR/d|w| >= 0``). Pruning is iterative: ``rounds``
(default 100) score -> prune rounds with the exponential density schedule, run by
:func:`prunelab.pruning.pruner.prune`.

As in the reference ``linearize``: the model is scored in eval mode (BatchNorm uses its running statistics,
made non-negative with every other floating parameter/buffer) on a batch of one all-ones input. The work
happens on a float64 deep copy, so the model's parameters, signs, buffers and modes are never touched and the
product of ~20-50 layer gains (up to ~1e30 for VGG-19, more for ResNet-50) cannot overflow (float64 reaches
1e308). The input shape comes from the ``input_shape`` option/attribute (the pipeline sets
``scorer.input_shape = datamodule.input_shape``) or else from the first batch.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from prunelab.pruning.masks import MaskSet
from prunelab.pruning.scorers.base import Batch, Scorer, register_scorer


def synaptic_flow_copy(model: nn.Module) -> nn.Module:
    """A float64, eval-mode deep copy of ``model`` with every floating parameter and buffer replaced by its
    absolute value (the reference ``linearize``)."""
    net = copy.deepcopy(model).to(torch.float64).eval()
    with torch.no_grad():
        for t in list(net.parameters()) + list(net.buffers()):
            if t.is_floating_point():
                t.abs_()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


@register_scorer("synflow")
class SynFlowScorer(Scorer):
    """score = dR/dw ⊙ w on the absolute-valued network, R = sum of outputs on the all-ones input."""

    needs_data = False

    def __init__(self, rounds: int = 100, input_shape: Sequence[int] | None = None):
        if int(rounds) < 1:
            raise ValueError(f"method=synflow: rounds must be >= 1, got {rounds}")
        self.rounds = int(rounds)
        self.input_shape = list(input_shape) if input_shape is not None else None

    def _shape(self, batches: Sequence[Batch]) -> list[int]:
        if self.input_shape is not None:
            return [int(s) for s in self.input_shape]
        if batches:
            return list(batches[0][0].shape[1:])
        raise ValueError("method=synflow needs the input shape: set scorer.input_shape or pass one batch")

    def score(
        self, model: nn.Module, masks: MaskSet, batches: Sequence[Batch] = ()
    ) -> dict[str, torch.Tensor]:
        net = synaptic_flow_copy(model)
        names = list(masks)
        params = [net.get_parameter(n) for n in names]
        for p in params:
            p.requires_grad_(True)
        device = next((p.device for p in net.parameters()), torch.device("cpu"))
        x = torch.ones([1, *self._shape(batches)], dtype=torch.float64, device=device)
        with torch.enable_grad():
            flow = net(x).sum()
            grads = torch.autograd.grad(flow, params, allow_unused=True)
        if not torch.isfinite(flow):
            raise FloatingPointError(
                f"method=synflow: the synaptic flow overflowed in float64 (R={flow.item()})"
            )
        return {
            n: (torch.zeros_like(p) if g is None else g * p).detach() for n, p, g in zip(names, params, grads)
        }
