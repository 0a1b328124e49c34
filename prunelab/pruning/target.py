"""Aim the pruning at a *direct* or an *effective* sparsity (Vysogorets & Kempe 2023, Sec. 4: methods are
compared at equal effective sparsity, obtained by pruning more directly).

``prune_to_target(..., target="effective")`` finds the number r of weights to remove (direct sparsity r / N)
such that the effective sparsity of the resulting masks reaches the requested sparsity, by bisection on r:

- invariant: ``eff(lo) < target <= eff(hi)``; ``hi`` starts at ``ceil(target * N)`` (the effective sparsity is
  never below the direct one, so this removal always suffices), ``lo`` at the removal of the incoming masks;
- stop when ``hi - lo <= step`` with ``step = max(1, floor(tol * N))`` (``tol = 0``: one weight), or after
  ``max_probes`` probes (a warning then reports the remaining gap); the masks at ``hi`` are returned, so the
  result always meets the target and, when the loop converges, removing ``step`` fewer weights would not.

Scores are re-used where the method allows: a one-shot scorer (``rounds == 1``) is evaluated once and every
probe only re-allocates the same scores (exactly what :func:`prunelab.pruning.pruner.prune` would do), so the
probe masks are nested in r and the effective sparsity is monotone in r; random pruning keeps the same seeded
scores, hence nested masks too. Iterative scorers (SynFlow) re-run the whole schedule per probe from a
snapshot of the weights (pruning zeroes weights; the snapshot is restored before every probe). The linearised
network of the effective-sparsity computation is built once and re-used by every probe.

Data parallelism: data-driven scorers shard the score batches over the ranks of an initialised process group
and all-reduce their sums (:mod:`prunelab.pruning.scorers.sharding`), so every rank computes the same scores
and masks; the bisection is deterministic given the scores, so every rank makes the same probes (each
scoring call is then a collective). ``info["score_world_size"]`` records how many ranks shared the scoring
(1: one process scored every batch).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from prunelab.pruning.allocation import Allocation
from prunelab.pruning.effective import EffectiveSparsity, report_from_effective
from prunelab.pruning.masks import MaskSet
from prunelab.pruning.pruner import prune
from prunelab.pruning.scorers.base import Batch, Scorer
from prunelab.pruning.scorers.sharding import score_group

logger = logging.getLogger(__name__)


def prune_with_scores(
    scores: Mapping[str, torch.Tensor], masks: MaskSet, allocation: Allocation, sparsity: float
) -> MaskSet:
    """Masks at ``sparsity`` from precomputed scores (the one-shot case of ``pruner.prune``, without
    re-scoring)."""
    return allocation.masks_from_scores(scores, masks, sparsity)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _restore(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(state[k])


class _Prober:
    """Masks and effective sparsity as a function of the removed count r."""

    def __init__(self, model, masks, scorer, allocation, batches, input_shape):
        self.model, self.masks, self.scorer, self.allocation = model, masks, scorer, allocation
        self.batches = batches
        self.N = masks.numel()
        self.snapshot = _snapshot(model)
        self.effective = EffectiveSparsity(model, input_shape)
        self.scores: dict[str, torch.Tensor] | None = None
        if int(scorer.rounds) <= 1:
            masks.apply(model)
            self.scores = scorer.score(model, masks, batches)
            _restore(model, self.snapshot)
        self.cache: dict[int, tuple[MaskSet, dict[str, Any]]] = {}
        self.probes = 0

    def __call__(self, removed: int) -> tuple[MaskSet, dict[str, Any]]:
        if removed in self.cache:
            return self.cache[removed]
        sparsity = removed / self.N
        if removed <= self.N - self.masks.remaining():
            new = self.masks.copy()
        elif self.scores is not None:
            new = prune_with_scores(self.scores, self.masks, self.allocation, sparsity)
        else:
            _restore(self.model, self.snapshot)
            new = prune(self.model, self.masks.copy(), self.scorer, self.allocation, sparsity, self.batches)
            _restore(self.model, self.snapshot)
        eff, connected = self.effective.reach(new)
        self.probes += 1
        self.cache[removed] = (new, report_from_effective(new, eff, connected))
        return self.cache[removed]


def prune_to_target(
    model: nn.Module,
    masks: MaskSet,
    scorer: Scorer,
    allocation: Allocation,
    sparsity: float,
    batches: Sequence[Batch] = (),
    target: Literal["direct", "effective"] = "direct",
    input_shape: Sequence[int] | None = None,
    max_probes: int = 30,
    tol: float = 0.0,
) -> tuple[MaskSet, dict[str, Any]]:
    """Prune ``model`` so that its direct (``target="direct"``) or effective (``"effective"``) sparsity is
    ``sparsity``. Returns the masks (applied to ``model``: pruned weights are zero) and an info dict with
    ``target``, ``sparsity_direct_needed`` (direct sparsity of the returned masks), ``sparsity_effective``,
    ``compression_effective``, ``layer_collapse``, ``probes`` (effective-sparsity evaluations),
    ``removed`` (r of the module docstring), ``step``, ``converged`` and ``score_world_size`` (ranks that
    shared the scoring of a data-driven scorer; 1 otherwise).
    ``input_shape`` (C, H, W) is needed to measure effective sparsity; without it ``target="direct"`` returns
    ``sparsity_effective=None``."""
    if target not in ("direct", "effective"):
        raise ValueError(f"prune.target must be 'direct' or 'effective', got {target!r}")
    world = score_group()[1] if scorer.needs_data else 1
    if target == "direct":
        out = prune(model, masks, scorer, allocation, sparsity, batches)
        info: dict[str, Any] = {"target": target, "sparsity_direct_needed": out.sparsity(), "probes": 0,
                                "score_world_size": world}
        if input_shape is not None:
            eff, connected = EffectiveSparsity(model, input_shape).reach(out)
            rep = report_from_effective(out, eff, connected)
            info.update(_summary(rep))
        else:
            info.update(sparsity_effective=None, compression_effective=None, layer_collapse=None)
        return out, info
    if input_shape is None:
        raise ValueError("prune.target=effective needs the input shape to measure effective sparsity")
    masks, info = _bisect(_Prober(model, masks, scorer, allocation, batches, input_shape), sparsity, max_probes, tol)
    info["score_world_size"] = world
    return masks, info


def _summary(rep: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "sparsity_direct_needed": rep["sparsity_direct"],
        "sparsity_effective": rep["sparsity_effective"],
        "compression_effective": rep["compression_effective"],
        "layer_collapse": rep["layer_collapse"],
    }


def _bisect(probe: _Prober, sparsity: float, max_probes: int, tol: float) -> tuple[MaskSet, dict[str, Any]]:
    N = probe.N
    step = max(1, int(math.floor(tol * N)))
    lo = N - probe.masks.remaining()
    hi = min(N, int(math.ceil(sparsity * N - 1e-9)))
    _, lo_rep = probe(lo)
    if lo_rep["sparsity_effective"] >= sparsity or hi <= lo:
        chosen, converged = lo, True
    else:
        _, hi_rep = probe(hi)
        # Quota allocations remove floor(s_l n_l) per layer, so asking for hi removals can remove a few
        # weights less; widen the upper bound (galloping) until it meets the target.
        inc = max(step, len(probe.masks) + 1)
        while hi_rep["sparsity_effective"] < sparsity:
            if hi >= N:
                raise RuntimeError("prune.target=effective: the target cannot be reached with these masks")
            lo, hi = hi, min(N, hi + inc)
            inc *= 2
            _, hi_rep = probe(hi)
        while hi - lo > step and probe.probes < max_probes:
            mid = (lo + hi) // 2
            if probe(mid)[1]["sparsity_effective"] >= sparsity:
                hi = mid
            else:
                lo = mid
        chosen, converged = hi, hi - lo <= step
        if not converged:
            logger.warning(
                "prune.target=effective: stopped after %d probes with %d weights between the bounds",
                probe.probes,
                hi - lo,
            )
    masks, rep = probe(chosen)
    _restore(probe.model, probe.snapshot)
    masks.apply(probe.model)
    info = {
        "target": "effective",
        "probes": probe.probes,
        "removed": chosen,
        "step": step,
        "converged": converged,
    }
    info.update(_summary(rep))
    return masks, info
