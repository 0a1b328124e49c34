"""GraSP: Gradient Signal Preservation (Wang, Zhang & Grosse, ICLR 2020).

GraSP (Eq. 8) scores every weight by ``S(-w) = -w ⊙ H g`` with ``g = dL/dw`` and ``H`` the Hessian of the loss,
and **removes the weights with the highest S** (removing them reduces the gradient norm the least, or even
increases it). Following the reference code: the logits are divided by a temperature ``T`` (default 200);
``g = sum_b dL_b/dw`` is accumulated over the batches *without* a graph and detached; then for every batch
``z_b = <dL_b/dw, g>`` is built with ``create_graph=True`` and ``H g = sum_b dz_b/dw`` (double
back-propagation, exact Hessian-vector product, no finite differences). On a masked model ``g`` is masked
(pruned weights are fixed at zero, so the product uses the Hessian block of the kept weights).

SIGN CONVENTION (read this): prunelab keeps the HIGHEST scores. This scorer therefore returns
``-S = +w ⊙ (H g)``, the NEGATED GraSP score, so that the allocation removes exactly the weights with the largest
GraSP score ``-w ⊙ H g``, as the GraSP paper prescribes. The reference code's normalisation by
``|sum S|`` is a positive constant and does not change the ranking, so it is omitted.

BatchNorm: as the reference code (which works on a deep copy left in training mode), scoring runs in training
mode by default (batch statistics); running statistics and module modes are restored afterwards (see
:func:`prunelab.pruning.scorers.snip.scoring_state`). The reference splits each batch into two halves and
samples a class-balanced batch; here the given batches are used as they are.

DDP: under an initialised multi-process group every rank takes its shard of the chosen batches; ``g`` is
all-reduced before the Hessian-vector products and ``H g`` after them (both are sums over batches, and
``H g = sum_b d<dL_b/dw, g>/dw`` needs the full ``g``), so every rank gets the single-process scores
(see :mod:`prunelab.pruning.scorers.sharding`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from prunelab.pruning.masks import MaskSet
from prunelab.pruning.scorers.base import Batch, Scorer
from prunelab.pruning.scorers.sharding import all_reduce_sum_, score_group, shard
from prunelab.pruning.scorers.snip import loss_grads, scoring_state, take_batches


def hessian_gradient_product(
    model: nn.Module,
    params: Sequence[torch.Tensor],
    batches: Sequence[Batch],
    temperature: float,
    grad_masks: Sequence[torch.Tensor] | None = None,
    distributed: bool = True,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(g, H g)`` for the summed loss ``sum_b L_b`` (logits / ``temperature``) w.r.t. ``params``; ``g`` is
    multiplied by ``grad_masks`` (if given) before the product. The model must be in the wanted mode.
    With ``distributed`` and an initialised multi-process group, ``batches`` (the same list on every rank)
    is sharded over the ranks and both sums are all-reduced: a collective, call it on every rank."""
    rank, world = score_group() if distributed else (0, 1)
    batches = shard(batches, rank, world)
    g = [torch.zeros_like(p) for p in params]
    for batch in batches:
        for acc, gb in zip(g, loss_grads(model, params, batch, temperature)):
            if gb is not None:
                acc += gb.detach()
    if world > 1:
        all_reduce_sum_(g)
    if grad_masks is not None:
        g = [gi * m.to(device=gi.device, dtype=gi.dtype) for gi, m in zip(g, grad_masks)]
    hg = [torch.zeros_like(p) for p in params]
    for batch in batches:
        grads = loss_grads(model, params, batch, temperature, create_graph=True)
        z = sum((gb * gi).sum() for gb, gi in zip(grads, g) if gb is not None)
        if not isinstance(z, torch.Tensor) or not z.requires_grad:
            continue  # the loss is linear in the weights on this batch: H g = 0
        for acc, h in zip(hg, torch.autograd.grad(z, list(params), allow_unused=True)):
            if h is not None:
                acc += h.detach()
    if world > 1:
        all_reduce_sum_(hg)
    return g, hg


class GraSPScorer(Scorer):
    """Returns ``+w ⊙ (H g)`` = minus the GraSP score, so keeping the highest returned scores removes the
    highest GraSP scores ``-w ⊙ H g`` (Wang et al. 2020, Eq. 8)."""
    name = "grasp"

    needs_data = True

    def __init__(self, num_batches: int = 1, temperature: float = 200.0, train_mode: bool = True):
        if temperature <= 0:
            raise ValueError(f"method=grasp: temperature must be > 0, got {temperature}")
        self.num_batches = int(num_batches)
        self.temperature = float(temperature)
        self.train_mode = bool(train_mode)

    def score(self, model: nn.Module, masks: MaskSet, batches: Sequence[Batch]) -> dict[str, torch.Tensor]:
        names = list(masks)
        params = [model.get_parameter(n) for n in names]
        chosen = take_batches(batches, self.num_batches, self.name)
        with scoring_state(model, params, self.train_mode):
            _, hg = hessian_gradient_product(
                model, params, chosen, self.temperature, [masks[n] for n in names]
            )
        return {n: p.detach() * h for n, p, h in zip(names, params, hg)}
