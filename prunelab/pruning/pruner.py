"""Score -> allocate -> mask, for one-shot and iterative scorers.

``prune`` is the single entry point used by every schedule: it applies the current masks, asks the scorer
for scores (``rounds`` times for iterative scorers such as SynFlow, with the exponential density schedule of :mod:`prunelab.pruning.density`),
lets the allocation turn scores into masks and returns the new :class:`MaskSet`, with the model's pruned
weights set to zero.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from prunelab.pruning.allocation import Allocation
from prunelab.pruning.density import density_schedule
from prunelab.pruning.masks import MaskSet
from prunelab.pruning.scorers.base import Batch, Scorer


def prune(
    model: nn.Module,
    masks: MaskSet,
    scorer: Scorer,
    allocation: Allocation,
    sparsity: float,
    batches: Sequence[Batch] = (),
) -> MaskSet:
    """Prune ``model`` to ``sparsity`` (fraction of the prunable weights in ``masks`` removed)."""
    start_density = 1.0 - masks.sparsity()
    for density in density_schedule(start_density, 1.0 - sparsity, max(1, int(scorer.rounds))):
        masks.apply(model)
        scores = scorer.score(model, masks, batches)
        masks = allocation.masks_from_scores(scores, masks, 1.0 - density)
    masks.apply(model)
    return masks
