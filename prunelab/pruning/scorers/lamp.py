"""LAMP: Layer-Adaptive Magnitude-based Pruning (Lee, Park, Mo, Ahn & Shin, ICLR 2021).

LAMP score (paper, Eq. 3): within one layer, with the weights sorted so that ``|w_u|`` is increasing,
``score(u) = w_u^2 / sum_{v >= u} w_v^2``, i.e. the denominator sums the squares of every weight at least as
large as ``u``. Ties are treated exactly as this set definition says: tied weights share the denominator
that includes all of them (the reference code breaks ties by sort order). Computed in float64 by one sort
and one suffix sum per layer. Meant for the ``global`` allocation: every layer's largest weight scores 1, so
no layer is ever fully pruned while some layer still has two weights. A layer whose weights are all zero
scores 0 everywhere.
"""

from __future__ import annotations

import torch

from prunelab.pruning.scorers.base import Scorer


def lamp_scores(weight: torch.Tensor) -> torch.Tensor:
    """LAMP scores of one tensor (same shape), float64."""
    sq = weight.detach().to(torch.float64).flatten() ** 2
    sorted_sq, order = torch.sort(sq)
    suffix = torch.flip(torch.cumsum(torch.flip(sorted_sq, [0]), 0), [0])
    first_of_tie = torch.searchsorted(sorted_sq, sorted_sq, side="left")
    denom = suffix[first_of_tie]
    ratio = torch.where(denom > 0, sorted_sq / denom.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    out = torch.empty_like(sq)
    out[order] = ratio
    return out.view(weight.shape)


class LAMPScorer(Scorer):
    """score(u) = w_u^2 / sum_{v: w_v^2 >= w_u^2} w_v^2 per layer (Lee et al. 2021, Eq. 3)."""
    name = "lamp"

    def score(self, model, masks, batches=()):
        return {n: lamp_scores(model.get_parameter(n)) for n in masks}
