"""SynFlow: Iterative Synaptic Flow Pruning (Tanaka, Kunin, Yamins & Ganguli, NeurIPS 2020).

Data-free. With every parameter replaced by its absolute value, the network evaluated on the all-ones input
gives the synaptic flow ``R = 1^T (prod_l |W_l|) 1`` (paper, Eq. 2, in general ``R = sum of the outputs``) and
the score of a weight is ``S(w) = dR/dw ⊙ w`` (positive: ``dR/d|w| >= 0``). Pruning is iterative: ``rounds``
(default 100) score -> prune rounds with the exponential density schedule, run by
:func:`prunelab.pruning.pruner.prune`.

Reference options (``linearize``, ``count_rule``): the two reference codes differ from each other.

* ``linearize="abs"`` (default, Tanaka et al.'s ``ganguli-lab/Synaptic-Flow`` ``Pruners/pruners.py: SynFlow``):
  described below. ``linearize="linear"`` (Vysogorets & Kempe's ``avysogorets/effective-sparsity``
  ``pruning.py: prune_synflow``): a copy built without activations and without BatchNorm, max pooling replaced by
  average pooling, the absolute values of the conv/linear weights and every other parameter (biases) zero, so
  ``R`` is the purely linear path sum ``1^T |W_L| ... |W_1| 1``.
* ``count_rule`` (consumed by :func:`prunelab.pruning.pruner.prune`): ``round`` (default, prunelab) keeps
  ``round(N d_t)`` weights after round t; ``floor`` removes ``int(N - N d_t)``, the lowest scores among the
  unpruned (Vysogorets & Kempe); ``kthvalue`` thresholds at the k-th smallest of all N scores,
  ``k = int((1 - d_t) N)``, and prunes every score ``<=`` it, ties included (Tanaka et al.'s ``_global_mask``).
  Both references use the exponential schedule ``d_t = d^(t / 100)`` from the dense network, as prunelab.
* Precision: both references work in float32; prunelab in float64 (no overflow on deep networks).

With ``linearize="abs"``, as in the reference ``linearize``: the model is scored in eval mode (BatchNorm uses its running statistics,
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
from prunelab.pruning.scorers.base import Batch, Scorer


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


_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
                nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Tanh, nn.Sigmoid, nn.Softplus)


def _linear_replacement(mod: nn.Module) -> nn.Module | None:
    if isinstance(mod, _ACTIVATIONS + (nn.modules.batchnorm._BatchNorm,)):
        return nn.Identity()
    if isinstance(mod, nn.MaxPool2d):
        if mod.dilation not in (1, (1, 1)):
            raise ValueError("method.linearize=linear: a dilated max pooling has no average-pooling equivalent")
        return nn.AvgPool2d(mod.kernel_size, mod.stride, mod.padding, ceil_mode=mod.ceil_mode)
    if isinstance(mod, nn.AdaptiveMaxPool2d):
        return nn.AdaptiveAvgPool2d(mod.output_size)
    return None


def linear_flow_copy(model: nn.Module) -> nn.Module:
    """Vysogorets & Kempe's linearised network (``prune_synflow``: ``get_model(..., batchnorm=False,
    activation=False, pool='average')`` with the absolute initial kernels): a float64 eval-mode copy with
    activation and BatchNorm modules removed, max pooling replaced by average pooling, conv/linear weights
    replaced by their absolute values and every other parameter set to zero (biases)."""
    net = copy.deepcopy(model).to(torch.float64).eval()
    for name, mod in list(net.named_modules()):
        new = _linear_replacement(mod)
        if new is not None and name:
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, child, new)
    weights = {id(m.weight) for m in net.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))}
    with torch.no_grad():
        for p in net.parameters():
            if id(p) in weights:
                p.abs_()
            else:
                p.zero_()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


LINEARIZE = {"abs": synaptic_flow_copy, "linear": linear_flow_copy}
COUNT_RULES = ("round", "floor", "kthvalue")


class SynFlowScorer(Scorer):
    """score = dR/dw ⊙ w on the absolute-valued network, R = sum of outputs on the all-ones input.

    ``linearize``: ``abs`` (default; Tanaka et al.) | ``linear`` (Vysogorets & Kempe); ``count_rule``: ``round``
    (default; prunelab) | ``floor`` (Vysogorets & Kempe) | ``kthvalue`` (Tanaka et al.); see the module docstring.
    """
    name = "synflow"

    needs_data = False

    def __init__(self, rounds: int = 100, input_shape: Sequence[int] | None = None, linearize: str = "abs",
                 count_rule: str = "round"):
        if int(rounds) < 1:
            raise ValueError(f"method=synflow: rounds must be >= 1, got {rounds}")
        if linearize not in LINEARIZE:
            raise ValueError(f"method.linearize={linearize!r}; allowed values: {', '.join(LINEARIZE)}")
        if count_rule not in COUNT_RULES:
            raise ValueError(f"method.count_rule={count_rule!r}; allowed values: {', '.join(COUNT_RULES)}")
        self.rounds = int(rounds)
        self.input_shape = list(input_shape) if input_shape is not None else None
        self.linearize = linearize
        self.count_rule = count_rule

    def _shape(self, batches: Sequence[Batch]) -> list[int]:
        if self.input_shape is not None:
            return [int(s) for s in self.input_shape]
        if batches:
            return list(batches[0][0].shape[1:])
        raise ValueError("method=synflow needs the input shape: set scorer.input_shape or pass one batch")

    def score(
        self, model: nn.Module, masks: MaskSet, batches: Sequence[Batch] = ()
    ) -> dict[str, torch.Tensor]:
        net = LINEARIZE[self.linearize](model)
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
