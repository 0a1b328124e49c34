"""Stein variational gradient descent (SVGD; Liu & Wang, NeurIPS 2016, arXiv 1608.04471).

SVGD moves a set of particles ``z_1..z_M`` along the direction that most decreases the KL divergence to a
target ``p`` within the unit ball of an RKHS with kernel ``k`` (Liu & Wang 2016, eq. 8)::

    phi(z_i) = (1/M) * sum_j [ k(z_j, z_i) * grad_{z_j} log p(z_j) + grad_{z_j} k(z_j, z_i) ]

The first term drives particles to high density (kernel-smoothed gradient), the second repels them from each
other. Only ``grad log p`` is needed, so the normaliser of ``p`` never appears.

Kernel convention used throughout prunelab (RBF with the median heuristic of Liu & Wang's reference code)::

    k(x, y) = exp(-||x - y||^2 / h2),      h2 = med^2 / log(M + 1)

where ``med^2`` is the median of the squared pairwise distances over the pairs ``i < j``. Hence
``grad_x k(x, y) = -2 (x - y) / h2 * k(x, y)`` and the repulsive term for particle ``i`` is
``sum_j grad_{z_j} k(z_j, z_i) = (2 / h2) * sum_j (z_i - z_j) k(z_j, z_i)``, which points away from the
other particles. The bandwidth is treated as a constant (not differentiated), as in the reference code.

In high dimension the RBF kernel degenerates (all particles equidistant), so :func:`svgd_direction_blocks`
applies the update per block (prunelab: per layer of gate logits), each block with its own kernel and
bandwidth: a product of per-block kernels would couple blocks, whereas independent blocks keep every
layer's repulsion at its own scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["median_bandwidth", "rbf_kernel", "svgd_direction", "svgd_direction_blocks"]

_MIN_H2 = 1e-8


def _check_particles(z: Tensor) -> None:
    if z.dim() != 2:
        raise ValueError(f"particles must have shape (M, D), got {tuple(z.shape)}")


def median_bandwidth(z: Tensor) -> Tensor:
    """Median-heuristic bandwidth ``h2 = median_{i<j} ||z_i - z_j||^2 / log(M + 1)`` (Liu & Wang 2016).

    With a single particle (no pairs) ``h2 = 1`` (the kernel is then ``k(z, z) = 1`` whatever ``h2``).
    The result is floored at ``1e-8`` so that identical particles do not divide by zero.
    """
    _check_particles(z)
    m = z.shape[0]
    if m < 2:
        return torch.ones((), dtype=z.dtype, device=z.device)
    z = z.detach()
    d2 = _sq_dists(z)
    iu = torch.triu_indices(m, m, offset=1, device=z.device)
    med2 = torch.quantile(d2[iu[0], iu[1]], 0.5)
    return (med2 / math.log(m + 1)).clamp_min(_MIN_H2)


def rbf_kernel(z: Tensor, h2: Tensor | float | None = None) -> tuple[Tensor, Tensor]:
    """RBF kernel matrix and its summed gradient (the SVGD repulsive term).

    Args:
        z: particles, shape ``(M, D)``.
        h2: bandwidth ``h^2``; the median heuristic (:func:`median_bandwidth`) when ``None``.

    Returns:
        ``K`` of shape ``(M, M)`` with ``K[j, i] = k(z_j, z_i) = exp(-||z_j - z_i||^2 / h2)`` (symmetric) and
        ``grad_K`` of shape ``(M, D)`` with ``grad_K[i] = sum_j grad_{z_j} k(z_j, z_i)
        = (2 / h2) * sum_j (z_i - z_j) K[j, i]``.
    """
    _check_particles(z)
    if h2 is None:
        h2 = median_bandwidth(z)
    h2 = torch.as_tensor(h2, dtype=z.dtype, device=z.device)
    kmat = torch.exp(-_sq_dists(z) / h2)
    # sum_j (z_i - z_j) K_ji = z_i * sum_j K_ji - (K^T z)_i ; K is symmetric.
    grad_k = (2.0 / h2) * (z * kmat.sum(0).unsqueeze(1) - kmat.t() @ z)
    return kmat, grad_k


_DIRECT_LIMIT = 1 << 22


def _sq_dists(z: Tensor) -> Tensor:
    """Squared pairwise distances ``(M, M)``: exact differences when ``M^2 D`` is small, otherwise via the
    Gram matrix (memory ``O(M^2)`` rather than ``O(M^2 D)``), with an exactly zero diagonal."""
    m, d = z.shape
    if m * m * d <= _DIRECT_LIMIT:
        return (z.unsqueeze(1) - z.unsqueeze(0)).pow(2).sum(-1)
    sq = z.pow(2).sum(1)
    d2 = sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * (z @ z.t())
    d2 = d2.clamp_min(0.0)
    return d2 - torch.diag_embed(torch.diagonal(d2))


def svgd_direction(z: Tensor, grad_logp: Tensor, h2: Tensor | float | None = None) -> Tensor:
    """SVGD update direction (Liu & Wang 2016, eq. 8), shape ``(M, D)``.

    ``phi(z_i) = (1/M) sum_j [k(z_j, z_i) grad log p(z_j) + grad_{z_j} k(z_j, z_i)]``. Particles move as
    ``z <- z + eps * phi(z)``; to use a torch optimiser (which descends) set ``z.grad = -phi``.
    With one particle ``k(z, z) = 1`` and the repulsive term vanishes, so ``phi = grad log p`` exactly.
    """
    _check_particles(z)
    if grad_logp.shape != z.shape:
        raise ValueError(f"grad_logp shape {tuple(grad_logp.shape)} != particles shape {tuple(z.shape)}")
    z = z.detach()
    kmat, grad_k = rbf_kernel(z, h2)
    m = z.shape[0]
    return (kmat.t() @ grad_logp.detach() + grad_k) / m


def svgd_direction_blocks(zs: Sequence[Tensor], grads: Sequence[Tensor]) -> list[Tensor]:
    """:func:`svgd_direction` applied to each block ``(M, D_l)`` separately, each with its own bandwidth."""
    if len(zs) != len(grads):
        raise ValueError(f"{len(zs)} particle blocks but {len(grads)} gradient blocks")
    return [svgd_direction(z, g) for z, g in zip(zs, grads)]
