"""Truncated log-normal distribution math for BMRS (Wright, Igel, Selvan, NeurIPS 2024, arXiv 2406.01345).

The multiplicative noise ``theta`` of a unit lives on ``[a, b]``; everything is written in terms of
``x = log theta`` which, under the variational posterior, is a normal ``N(mu, sigma^2)`` truncated to
``[log a, log b]`` (Neklyudov et al. 2017, "Structured Bayesian pruning via log-normal multiplicative
noise", Sec. 3-4). The prior is log-uniform on ``[a, b]``, i.e. ``x`` uniform on ``[log a, log b]``.

Notation used in every docstring below: ``alpha = (log a - mu) / sigma``, ``beta = (log b - mu) / sigma``,
``Z = Phi(beta) - Phi(alpha)``, ``phi``/``Phi`` the standard normal density/CDF.

Numerics: all CDF differences are taken in log space (``torch.special.log_ndtr``) so that posteriors far
in a tail (``|alpha|, |beta|`` in the thousands, as at initialisation where ``sigma = e^-5``) stay finite.
The closed forms (``E[theta]``, ``std[theta]``, KL) are meant to be evaluated in float64; callers cast.
"""

from __future__ import annotations

import math

import torch
from torch.special import log_ndtr, ndtri

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
_DEEP_TAIL_LOG_P = -700.0  # below this exp(log p) underflows in float64: invert log Phi by Newton instead
_NEWTON_STEPS = 8


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate for ``x`` near 0 and very negative (Maechler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def log_phi(x: torch.Tensor) -> torch.Tensor:
    """Log of the standard normal density, ``log phi(x) = -x^2/2 - log sqrt(2 pi)``."""
    return -0.5 * x * x - LOG_SQRT_2PI


def log_ndtr_diff(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``log(Phi(hi) - Phi(lo))`` for ``lo < hi``, stable in both tails.

    Lower/central case: ``log Phi(hi) + log1p(-exp(log Phi(lo) - log Phi(hi)))``. When both points lie in
    the upper tail (``lo > 0``) the symmetric form ``Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi)`` is used so that
    the difference of two numbers close to 1 never occurs.
    """
    lo, hi = torch.broadcast_tensors(lo, hi)
    upper = lo > 0
    a = torch.where(upper, -hi, lo)  # the smaller argument, in the tail where Phi is small
    b = torch.where(upper, -lo, hi)
    lb = log_ndtr(b)
    return lb + log1mexp(log_ndtr(a) - lb)


def standardized_bounds(
    mu: torch.Tensor, sigma: torch.Tensor, log_a: float, log_b: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha, beta) = ((log a - mu) / sigma, (log b - mu) / sigma)``."""
    return (log_a - mu) / sigma, (log_b - mu) / sigma


def log_normaliser(mu: torch.Tensor, sigma: torch.Tensor, log_a: float, log_b: float) -> torch.Tensor:
    """``log Z = log(Phi(beta) - Phi(alpha))``, the truncation normaliser of ``N(mu, sigma^2)`` on the bounds."""
    alpha, beta = standardized_bounds(mu, sigma, log_a, log_b)
    return log_ndtr_diff(alpha, beta)


def log_prob_log_theta(
    x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, log_a: float, log_b: float
) -> torch.Tensor:
    """Log density of ``x = log theta`` under the truncated normal: ``log phi((x-mu)/sigma) - log sigma - log Z``
    inside ``[log a, log b]`` (``-inf`` outside)."""
    lp = log_phi((x - mu) / sigma) - torch.log(sigma) - log_normaliser(mu, sigma, log_a, log_b)
    return torch.where((x >= log_a) & (x <= log_b), lp, torch.full_like(lp, -math.inf))


def log_mass(
    mu: torch.Tensor, sigma: torch.Tensor, log_a: float, log_b: float, lo: float, hi: float
) -> torch.Tensor:
    """``log q(lo <= log theta <= hi)`` for ``log a <= lo < hi <= log b``:
    ``log[Phi((hi-mu)/sigma) - Phi((lo-mu)/sigma)] - log Z``."""
    if not (log_a <= lo < hi <= log_b):
        raise ValueError(f"need log_a <= lo < hi <= log_b, got {log_a}, {lo}, {hi}, {log_b}")
    return log_ndtr_diff((lo - mu) / sigma, (hi - mu) / sigma) - log_normaliser(mu, sigma, log_a, log_b)


def expected_theta(mu: torch.Tensor, sigma: torch.Tensor, log_a: float, log_b: float) -> torch.Tensor:
    """``E[theta] = exp(mu + sigma^2/2) [Phi(sigma - alpha) - Phi(sigma - beta)] / Z`` (Neklyudov et al. 2017,
    Sec. 4; BMRS paper Sec. 3). Evaluated as ``exp(mu + sigma^2/2 + log[...] - log Z)``."""
    alpha, beta = standardized_bounds(mu, sigma, log_a, log_b)
    log_e = mu + 0.5 * sigma**2 + log_ndtr_diff(sigma - beta, sigma - alpha) - log_ndtr_diff(alpha, beta)
    return torch.exp(log_e)


def _log_second_moment(mu: torch.Tensor, sigma: torch.Tensor, log_a: float, log_b: float) -> torch.Tensor:
    """``log E[theta^2] = 2 mu + 2 sigma^2 + log[Phi(2 sigma - alpha) - Phi(2 sigma - beta)] - log Z``."""
    alpha, beta = standardized_bounds(mu, sigma, log_a, log_b)
    return (
        2 * mu
        + 2 * sigma**2
        + log_ndtr_diff(2 * sigma - beta, 2 * sigma - alpha)
        - log_ndtr_diff(alpha, beta)
    )


def truncnorm_var(mu: torch.Tensor, sigma: torch.Tensor, log_a: float, log_b: float) -> torch.Tensor:
    """Variance of ``log theta``: ``sigma^2 [1 + (alpha phi(alpha) - beta phi(beta))/Z
    - ((phi(alpha) - phi(beta))/Z)^2]`` (standard truncated-normal result).

    Far in a tail (both bounds on one side of ``mu``, nearer one ``c`` with ``|c| > 1e3``) that bracket is a
    difference of ``O(c^2)`` terms and its asymptotic value ``1/c^2`` (relative error ``O(1/c^2)``; the
    interval width ``(log b - log a)/sigma`` is then far larger than ``1/|c|``) is used instead.
    """
    alpha, beta = standardized_bounds(mu, sigma, log_a, log_b)
    log_z = log_ndtr_diff(alpha, beta)
    ra, rb = torch.exp(log_phi(alpha) - log_z), torch.exp(log_phi(beta) - log_z)
    bracket = 1 + alpha * ra - beta * rb - (ra - rb) ** 2
    c = torch.where(alpha > 0, alpha, beta)
    far = (alpha * beta > 0) & (c.abs() > 1e3)
    return sigma**2 * torch.where(far, 1 / c**2, bracket)


def std_theta(mu: torch.Tensor, sigma: torch.Tensor, log_a: float, log_b: float) -> torch.Tensor:
    """``std[theta] = sqrt(E[theta^2] - E[theta]^2)`` with ``E[theta^2]`` in closed form (see
    :func:`_log_second_moment`).

    Written as ``E[theta] * sqrt(expm1(log E[theta^2] - 2 log E[theta]))``. When the relative variance is
    below ~1e-9 that difference is dominated by float64 rounding, and the first-order (delta-method)
    expansion ``std[theta] ~ E[theta] * std[log theta]`` -- exact to relative ``O(sigma^2)`` -- is used.
    """
    e = expected_theta(mu, sigma, log_a, log_b)
    rel_var = torch.expm1(_log_second_moment(mu, sigma, log_a, log_b) - 2 * torch.log(e))
    delta = truncnorm_var(mu, sigma, log_a, log_b)
    rel_var = torch.where(rel_var > 1e-9, rel_var, delta.clamp_min(0))
    return e * torch.sqrt(rel_var.clamp_min(0))


def snr(mu: torch.Tensor, sigma: torch.Tensor, log_a: float, log_b: float) -> torch.Tensor:
    """Signal-to-noise ratio ``E[theta] / std[theta]`` (Neklyudov et al. 2017, Sec. 4.1: prune if < 1)."""
    return expected_theta(mu, sigma, log_a, log_b) / std_theta(mu, sigma, log_a, log_b)


def kl_to_log_uniform(mu: torch.Tensor, sigma: torch.Tensor, log_a: float, log_b: float) -> torch.Tensor:
    """``KL(q || p)`` per unit, truncated log-normal posterior vs truncated log-uniform prior on ``[a, b]``
    (Neklyudov et al. 2017, Eq. 11; BMRS paper Sec. 3):

    ``KL = -log sigma - log Z - 1/2 log(2 pi e) + log(log b - log a) - (alpha phi(alpha) - beta phi(beta)) / (2Z)``.

    ``phi(.)/Z`` is formed in log space so that it stays finite when ``Z`` underflows.
    """
    alpha, beta = standardized_bounds(mu, sigma, log_a, log_b)
    log_z = log_ndtr_diff(alpha, beta)
    ra, rb = torch.exp(log_phi(alpha) - log_z), torch.exp(log_phi(beta) - log_z)
    return (
        -torch.log(sigma)
        - log_z
        - 0.5 * math.log(2 * math.pi * math.e)
        + math.log(log_b - log_a)
        - 0.5 * (alpha * ra - beta * rb)
    )


def _ndtri_log_impl(log_p: torch.Tensor) -> torch.Tensor:
    """``Phi^{-1}(exp(log_p))`` in float64. ``ndtri(exp(.))`` where ``exp`` is representable, else an
    asymptotic start (``log Phi(x) ~ -x^2/2 - log(-x) - log sqrt(2 pi)``) polished by Newton steps on
    ``log Phi(x) - log_p`` (``log Phi`` is concave, so Newton converges monotonically)."""
    lp = log_p.detach().double()
    x = ndtri(torch.exp(lp))
    deep = lp < _DEEP_TAIL_LOG_P
    if bool(deep.any()):
        ld = lp[deep]
        t = -2.0 * ld
        xd = -torch.sqrt(t - torch.log(t) - math.log(2 * math.pi))
        for _ in range(_NEWTON_STEPS):
            f = log_ndtr(xd) - ld
            xd = xd - f / torch.exp(log_phi(xd) - log_ndtr(xd))
        x[deep] = xd
    return x.to(log_p.dtype)


def _sample_eps(alpha: torch.Tensor, beta: torch.Tensor, log_z: torch.Tensor, u: torch.Tensor):
    """``eps = Phi^{-1}(Phi(alpha) + u Z)``, inverting the smaller of ``p`` and ``1 - p`` in log space (see
    :func:`sample_log_theta`), with ``log u`` and ``log(1 - u)``; no gradient."""
    log_u, log1m_u = torch.log(u), torch.log1p(-u)
    lp_lo = torch.logaddexp(log_ndtr(alpha), log_u + log_z)
    lp_hi = torch.logaddexp(log_ndtr(-beta), log1m_u + log_z)
    eps = _ndtri_log_impl(torch.minimum(lp_lo, lp_hi))
    return torch.where(lp_lo <= lp_hi, eps, -eps), log_u, log1m_u


class _TruncatedNormalSample(torch.autograd.Function):
    """``x = mu + sigma eps``, ``eps = Phi^{-1}((1 - u) Phi(alpha) + u Phi(beta))``, clamped to the bounds,
    with its pathwise gradient in closed form. Differentiating ``Phi(eps) = (1 - u) Phi(alpha) + u Phi(beta)``
    implicitly (``d alpha / d mu = -1/sigma``, ``d alpha / d sigma = -alpha/sigma``, the same for ``beta``)::

        dx/dmu    = 1   - [(1 - u) phi(alpha)       + u phi(beta)]      / phi(eps)
        dx/dsigma = eps - [(1 - u) alpha phi(alpha) + u beta phi(beta)] / phi(eps)

    with each ratio formed in log space (``exp(log(1 - u) + log phi(alpha) - log phi(eps))``), so it stays
    finite where the densities underflow. The same gradient as autograd through the forward's operations (tested
    against it), more cheaply: backward is a few element-wise operations on the sample instead of the graph of
    ``logaddexp``/``log_ndtr``/``ndtri`` over every element (docs/benchmarks.md)."""

    @staticmethod
    def forward(ctx, mu, sigma, u, log_a: float, log_b: float):  # type: ignore[override]
        alpha, beta = standardized_bounds(mu, sigma, log_a, log_b)
        eps, log_u, log1m_u = _sample_eps(alpha, beta, log_ndtr_diff(alpha, beta), u)
        x = mu + sigma * eps
        ctx.shapes = (mu.shape, sigma.shape)
        ctx.save_for_backward(log_u, log1m_u, eps, alpha, beta, (x >= log_a) & (x <= log_b))
        return x.clamp(log_a, log_b)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        log_u, log1m_u, eps, alpha, beta, inside = ctx.saved_tensors
        mu_shape, sigma_shape = ctx.shapes
        grad = grad * inside  # the clamp passes no gradient where it bites (as torch.clamp)
        log_phi_eps = log_phi(eps)
        ra = torch.exp(log1m_u + (log_phi(alpha) - log_phi_eps))
        rb = torch.exp(log_u + (log_phi(beta) - log_phi_eps))
        g_mu = g_sigma = None
        if ctx.needs_input_grad[0]:
            g_mu = (grad * (1 - ra - rb)).sum_to_size(mu_shape)
        if ctx.needs_input_grad[1]:
            g_sigma = (grad * (eps - alpha * ra - beta * rb)).sum_to_size(sigma_shape)
        return g_mu, g_sigma, None, None, None


def sample_log_theta(
    mu: torch.Tensor, sigma: torch.Tensor, log_a: float, log_b: float, u: torch.Tensor
) -> torch.Tensor:
    """Reparameterised sample of ``log theta`` by the inverse CDF (Neklyudov et al. 2017, Sec. 4):
    ``x = mu + sigma Phi^{-1}(Phi(alpha) + u Z)`` with ``u ~ U(0, 1)``; ``mu``, ``sigma`` broadcast against ``u``
    (per-unit parameters, one ``u`` per draw).

    In log space and always in the lower half of the normal: with ``p = Phi(alpha) + u Z`` and its complement
    ``1 - p = Phi(-beta) + (1 - u) Z``, ``log p = logaddexp(log Phi(alpha), log u + log Z)`` and the same for
    ``1 - p``; the smaller of the two is inverted (``x = mu + sigma Phi^{-1}(p)`` or
    ``x = mu - sigma Phi^{-1}(1 - p)``). This is exact in both tails, so samples stay in ``[log a, log b]``
    even for ``mu`` far outside the bounds; the final clamp only removes last-bit rounding. The gradient with
    respect to ``mu`` and ``sigma`` is the pathwise one in closed form (:class:`_TruncatedNormalSample`).
    """
    u = u.clamp(torch.finfo(u.dtype).tiny, 1.0 - torch.finfo(u.dtype).eps)
    return _TruncatedNormalSample.apply(mu, sigma, u, float(log_a), float(log_b))
