"""Score -> allocate -> mask, for one-shot and iterative scorers.

``prune`` is the single entry point used by every schedule: it applies the current masks, asks the scorer
for scores (``rounds`` times for iterative scorers such as SynFlow, with the exponential density schedule of :mod:`prunelab.pruning.density`),
lets the allocation turn scores into masks and returns the new :class:`MaskSet`, with the model's pruned
weights set to zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from prunelab.pruning.allocation import Allocation
from prunelab.pruning.density import density_schedule
from prunelab.pruning.masks import MaskSet
from prunelab.pruning.scorers.base import Batch, Scorer

COUNT_RULES = ("round", "floor", "kthvalue")


def kthvalue_masks(scores, masks: MaskSet, density: float) -> MaskSet:
    """Tanaka et al.'s global rule (``ganguli-lab/Synaptic-Flow`` ``Pruners/pruners.py: _global_mask``):
    ``k = int((1 - density) * N)`` over ALL N prunable weights (pruned ones score 0, as their weight is 0), the
    k-th smallest score is the threshold and every weight scoring ``<= threshold`` is pruned (ties pruned
    together, so more than k can go); nothing is pruned when ``k < 1``."""
    names = list(masks)
    flat = torch.cat([torch.where(masks[n].to(scores[n].device), scores[n].detach(), 0).flatten().double().cpu()
                      for n in names])
    k = int((1.0 - density) * flat.numel())
    if k < 1:
        return masks.copy()
    threshold = torch.kthvalue(flat, k).values
    out = {}
    for n in names:
        s = torch.where(masks[n].to(scores[n].device), scores[n].detach(), 0).double().cpu()
        out[n] = ((s > threshold) & masks[n].cpu()).to(masks[n].device)
    return MaskSet(out)


def prune(
    model: nn.Module,
    masks: MaskSet,
    scorer: Scorer,
    allocation: Allocation,
    sparsity: float,
    batches: Sequence[Batch] = (),
) -> MaskSet:
    """Prune ``model`` to ``sparsity`` (fraction of the prunable weights in ``masks`` removed).

    The scorer's ``count_rule`` (SynFlow's option; default ``round``) says how many weights each round keeps at
    density ``d_t``: ``round`` keeps ``round(N d_t)`` (prunelab); ``floor`` removes ``int(N - N d_t)``, the lowest
    scores among the unpruned (Vysogorets & Kempe's code, ``pruning.py: prune_synflow``); ``kthvalue`` is
    Tanaka et al.'s threshold rule (:func:`kthvalue_masks`, global allocation only)."""
    rule = getattr(scorer, "count_rule", "round")
    if rule not in COUNT_RULES:
        raise ValueError(f"method.count_rule={rule!r}; allowed values: {', '.join(COUNT_RULES)}")
    if rule == "kthvalue" and allocation.name != "global":
        raise ValueError(f"method.count_rule=kthvalue is Tanaka et al.'s global rule: use allocation=global, "
                         f"not allocation={allocation.name}")
    n = masks.numel()
    start_density = 1.0 - masks.sparsity()
    for density in density_schedule(start_density, 1.0 - sparsity, max(1, int(scorer.rounds))):
        masks.apply(model)
        scores = scorer.score(model, masks, batches)
        if rule == "kthvalue":
            masks = kthvalue_masks(scores, masks, density)
        elif rule == "floor":
            masks = allocation.masks_from_scores(scores, masks, int(n - n * density) / n)
        else:
            masks = allocation.masks_from_scores(scores, masks, 1.0 - density)
    masks.apply(model)
    return masks
