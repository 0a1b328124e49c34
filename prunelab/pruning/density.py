"""Density schedules: the one formula behind every multi-round pruning schedule.

``density_schedule(d0, dT, T)`` is the exponential (geometric) schedule ``d_t = d0 * (dT / d0) ** (t / T)``,
``t = 1..T``: each round keeps the same fraction of what the round before kept. SynFlow's iterative rounds
(:func:`prunelab.pruning.pruner.prune`, ``d0`` = the current density) and the lottery-ticket rounds of
``schedule=iterative`` (:func:`round_sparsities`, ``d0 = 1``: sparsity after round r is
``1 - (1 - s) ** (r / N)``) both use it.
"""

from __future__ import annotations


def density_schedule(start_density: float, final_density: float, rounds: int) -> list[float]:
    """Exponential schedule: density after round t is start * (final / start) ** (t / rounds)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if final_density <= 0:
        return [0.0] * rounds
    ratio = final_density / start_density
    return [start_density * ratio ** (t / rounds) for t in range(1, rounds + 1)]


def round_sparsities(sparsity: float, rounds: int) -> list[float]:
    """Sparsity after each of ``rounds`` rounds from a dense network to ``sparsity``: ``1 - (1 - s) ** (r / N)``."""
    return [1.0 - d for d in density_schedule(1.0, 1.0 - sparsity, rounds)]
