"""DLLP: Stein variational pruning with reliability estimates.

prunelab's implementation of the *abstract* of Wang et al., "Efficient Stein Variational Inference for
Reliable Distribution-lossless Network Pruning" (arXiv 2212.03537). Only the abstract is public: magnitude
pruning truncates one shared weight distribution and discards useful small weights; DLLP instead treats the
vanilla (dense, pretrained) network as a *prior* over which sub-network is the pruned "lottery" and which
weights are redundancy, approximates the posterior over that choice with Stein variational gradient descent
(SVGD; Liu & Wang 2016), which needs only gradients of the log-density, and reports quantified reliability.
Everything below is prunelab's concrete design of that idea, not a copy of unpublished details.

Model
-----
* Latent variables: one logit ``z_u`` per prunable unit (output neuron of a ``Linear``, output channel of a
  convolution; or, ``granularity="weight"``, one per weight of a ``Linear`` for small MLPs). A unit's output
  is multiplied by the gate ``g_u = sigmoid(z_u / tau)`` (``gate_mode="soft"``), by the hard gate
  ``1[z_u > 0]`` with the soft gate's gradient (``"ste"``, straight-through), or by the hard gate alone
  (``"hard"``, evaluation). ``tau`` is annealed from ``tau_start = 1`` to ``tau_end = 0.1`` by
  :meth:`DLLP.set_progress` (geometric ``tau = tau_start (tau_end / tau_start)^f`` by default, or linear),
  so that the soft gates approach the binary decision the pruned network will make. The gate multiplies the
  layer's (or its BatchNorm's) output *before* the activation; for a positively homogeneous activation
  (ReLU) ``act(g a) = g act(a)`` for ``g >= 0``, and with soft gates (``g > 0``) ``d/dg act(g a) = act(a)``
  as for a gate after the activation. Caveat (measured): with ``"ste"`` an *off* unit's hard gate is exactly
  0, the ReLU's derivative at 0 is 0, so the data term cannot switch an off unit back on; ``"soft"`` (the
  default) does not have this problem.
  A convolution (or ``Linear``) immediately followed by a BatchNorm over the same channels is gated after the
  BatchNorm (gating before it would be normalised away). The classifier output layer is never gated.
* Weights ``W``: the pretrained dense network's. ``method=dllp`` keeps them **frozen** by default
  (``train_weights: false``; BatchNorm in eval mode, ``DLLPModel(bn_eval=True)``), so the posterior is over
  which units *of the given network* the data needs; :meth:`DLLP.train_step` without ``w_opt`` does the same.
  Why: the question the abstract asks is which part of the vanilla network is redundant; if ``W`` trains
  alongside, the weights adapt to every particle's sub-network, the likelihood of a gate configuration is no
  longer that of the given network, and gradient descent on ``W`` (and weight decay) is not invariant to
  reparameterisation, so a function-preserving rescaling of a unit changes the trajectory and the decision.
  ``train_weights: true`` is kept as an option (the pipeline's optimiser then steps ``W``).
* Prior from the vanilla network: per unit an importance ``I_u``, standardised in log-space within its layer,
  ``s_u = (log I_u - mean_l) / sd_l``, calibrated to a keep-probability
  ``pi_u = clip(sigmoid(s_u / T + c), 0.05, 0.95)``; the common logit shift ``c`` is found by bisection so that
  the prior's expected kept fraction ``sum_u pi_u / U`` meets ``target_density`` (``c = 0`` without one). The
  prior on each logit is the two-component mixture ``p(z_u) = pi_u N(z_u; +3, 1) + (1 - pi_u) N(z_u; -3, 1)``
  (:func:`log_prior`), so ``P(z_u > 0)`` is ``pi_u`` up to ``Phi(-3) = 0.00135``. Importances:

  - function-based (:mod:`~prunelab.pruning.bayes.dllp_prior`, measured through the gates on a few fixed
    training batches): ``taylor`` (default of ``method=dllp``; ``sqrt(mean_b (dE_b/dg_u)^2)`` at ``g = 1``) and
    ``ablation`` (loss increase when the unit alone is removed). Both are **invariant** to a function-preserving
    rescaling of a ReLU unit (incoming row and bias ``x c``, outgoing column ``x 1/c``): the loss is the same
    function of the gates before and after it (``(1/c) W relu(g c a) = W relu(g a)``);
  - magnitude-based: ``l2`` (incoming-weight norm; the default of the low-level :func:`attach_gates`, which may
    have no data) and ``bn`` (``|gamma|``); multiplied by ``c`` under the rescaling, NOT invariant: a unit the
    function needs can carry a tiny norm (issue #14), and then only the likelihood can rescue it.
* Unit budget: the likelihood of a frozen network almost always prefers *more* units (every useful unit
  lowers the loss by far more than the prior's at most ``logit(0.95) = 2.9`` nats), so without a constraint
  the particles drift to dense sub-networks and ``rho`` says little about which units to remove at the
  requested sparsity. With ``density`` (``method=dllp``: ``1 - sparsity``, ``budget_lr > 0``) the target is
  tilted, ``log p(z | D) + log_budget(z)`` with ``log_budget = -lam * data_weight * N * (sum_u g_u / U)``:
  the I-projection of the posterior onto ``{E[kept fraction] = density}`` is the exponentially tilted posterior
  (maximum entropy), and its multiplier ``lam >= 0`` is found by dual ascent during the run,
  ``lam <- max(0, lam + budget_lr (mean_m kept fraction_m - density))`` after every particle step
  (:meth:`DLLP.update_dual`). Each particle then is a sub-network at about the requested size that the data
  likes, and ``rho`` ranks units by how many of them need the unit. Particles are identical across DDP ranks,
  so is ``lam``.
* Target density per particle: ``log p(z | D) = data_weight (N / B) sum_{b in batch} log p(y_b | x_b, z, W) +
  log p(z) + log_budget(z) + const`` (minibatch estimate of the full-data log posterior, ``N`` training
  examples). The data term is invariant to the rescaling above for the same reason as the importances; with
  a function-based prior and ``W`` frozen every term is, so the decisions are (up to floating-point
  rounding) the same for the net and its rescaled twin, seed for seed (``tests/test_dllp.py``).

Inference
---------
``M`` particles (default 10) of all gate logits, initialised from the prior (or ``N(0, init_std^2)``). Each
step :meth:`DLLP.svgd_step` computes ``grad_z log p(z_m | D)`` for every particle with one autograd call
(particles are independent in the batched forward, so the gradient of the sum is the per-particle gradient)
and sets ``z.grad = -phi`` with the SVGD direction ``phi`` (:mod:`prunelab.pruning.bayes.svgd`, RBF kernel,
median bandwidth, one kernel per layer block), for a torch optimiser (Adam; ``method=dllp``: lr 0.1). With a
weight optimiser (``train_weights``) the shared weights take one step on the cross-entropy averaged over
particles (:meth:`DLLP.loss_weights`), from the same forward pass (:meth:`DLLP.train_step`).

All particles share one forward pass (:class:`DLLPModel`): the batch is repeated ``M`` times along the batch
dimension (particle-major: row ``m * B + b``), and forward hooks on the gated modules multiply the output by
the particle's gates, broadcast as ``(M, 1, U, 1, 1)`` over the ``(M, B, U, H, W)`` view. In training mode
BatchNorm statistics are computed per particle (each particle's batch normalised on its own, exactly as in
``M`` separate forwards), and the running statistics move by the average of the particles' batch statistics
(unless ``bn_eval``: then BatchNorm uses its running statistics, as the deployed network will).

Measured behaviour (issue #14). With the former defaults (``l2`` prior, ``W`` trained, Adam lr 0.01 on
the particles, no budget) SVGD flipped only 0.4-3.4 % of the particle signs: Adam moves a logit by about
``lr`` per step, so crossing from a prior mode (``+-3``) to 0 takes ~300 consistent steps, and once ``tau``
is small the gates saturate and the data gradient vanishes; the decisions were the magnitude rule's on
70-80 % of units. With lr 0.1, ``W`` frozen and the budget tilt the likelihood moves particles (about 20 % of
the signs flip on a digits MLP in 300 steps; ``posterior_shift`` reports it). SVGD with one RBF kernel per
layer still moves particles as a herd when the likelihood is sharp, so ``rho`` is coarse (multiples of
``1 / M``): the reliability report exposes this (standard errors, undecided fraction).

Decision and reliability
------------------------
The inclusion probability ``rho_u`` is the fraction of particles with ``z_u > 0``. A unit is kept iff
``rho_u >= 0.5`` (or the top units by ``rho``, ties broken by the mean logit, meet an explicit sparsity),
giving ONE pruned network (:meth:`DLLP.masks`, :meth:`DLLP.pruned_model`) that the pipeline fine-tunes.
:meth:`DLLP.reliability` reports ``rho`` with its binomial standard error ``sqrt(rho (1 - rho) / M)``, the
fraction of undecided units (``0.2 < rho < 0.8``), per-particle sparsity, the particle ensemble's predictive
metrics (:func:`prunelab.metrics.reliability.ensemble_metrics`: accuracy, NLL, Brier, ECE, entropy, BALD
mutual information, per-particle accuracy), the agreement of the deployed pruned network with the ensemble, and
:meth:`DLLP.posterior_shift` (how far ``rho`` moved from ``pi``: mean ``|rho - pi|``, prior-mode flips, KL and
JS between ``Bernoulli(rho)`` and ``Bernoulli(pi)``, particle sign flips since initialisation, decided units
that differ from the prior's own top units).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunelab.metrics.reliability import agreement, ensemble_metrics
from prunelab.pruning.bayes.dllp_prior import FUNCTION_IMPORTANCES, floored, function_importance
from prunelab.pruning.bayes.svgd import svgd_direction_blocks
from prunelab.pruning.units.layers import BN_TYPES
from prunelab.pruning.units.sites import LayerSite, attach, layer_sites

__all__ = [
    "DLLP",
    "DLLPModel",
    "GateSite",
    "ParticleGates",
    "attach_gates",
    "calibrated_keep_prob",
    "find_gate_sites",
    "gate_values",
    "log_prior",
    "prior_keep_prob",
    "sample_prior",
    "unit_importance",
]

log = logging.getLogger(__name__)

PRIOR_MEAN = 3.0
PRIOR_STD = 1.0
PRIOR_CLIP = (0.05, 0.95)
GRANULARITIES = ("unit", "weight")
MAGNITUDE_IMPORTANCES = ("l2", "bn")
IMPORTANCES = FUNCTION_IMPORTANCES + MAGNITUDE_IMPORTANCES
GATE_MODES = ("soft", "ste", "hard")


# ---------------------------------------------------------------------------------------------------------
# gate sites
# ---------------------------------------------------------------------------------------------------------
@dataclass
class GateSite:
    """A gated layer: ``name`` is the prunable layer's module name; ``bn_name`` the BatchNorm right after it
    (the gate then sits on the BatchNorm's output); ``units`` the number of gate logits."""

    name: str
    layer: nn.Module
    kind: str
    granularity: str
    units: int
    bn_name: str | None = None
    bn: nn.Module | None = field(default=None, repr=False)
    site: LayerSite | None = field(default=None, repr=False)  # the layer site of :mod:`prunelab.pruning.units`

    @property
    def hook_name(self) -> str:
        """Module whose output is gated."""
        return self.bn_name if (self.bn_name is not None and self.granularity == "unit") else self.name


def find_gate_sites(
    model: nn.Module, granularity: str = "unit", exclude: Iterable[str] = (), skip_output: bool = True,
    example: Tensor | None = None,
) -> list[GateSite]:
    """The layers DLLP gates, in forward order (registration order without an ``example`` batch): the sites of
    :func:`~prunelab.pruning.units.sites.layer_sites` (every ``Linear``/``Conv{1,2,3}d`` except the classifier
    output, ``skip_output``, and those whose module name matches an fnmatch pattern in ``exclude``). A layer
    whose site has a BatchNorm over its output channels is paired with it. ``granularity="weight"`` gates
    every weight of ``Linear`` layers (convolutions are not supported at that granularity).
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    sites: list[GateSite] = []
    for ls in layer_sites(model, exclude, skip_classifier=skip_output, example=example):
        layer = model.get_submodule(ls.layer)
        kind = "linear" if isinstance(layer, nn.Linear) else "conv"
        if granularity == "weight" and kind != "linear":
            raise ValueError(
                f"granularity='weight' supports Linear layers only; {ls.layer!r} is {type(layer).__name__}"
            )
        bn_name = ls.norm if ls.norm is not None and isinstance(model.get_submodule(ls.norm), BN_TYPES) else None
        bn = model.get_submodule(bn_name) if bn_name is not None else None
        units = ls.units if granularity == "unit" else layer.weight.numel()
        sites.append(GateSite(ls.layer, layer, kind, granularity, units, bn_name, bn, ls))
    if not sites:
        raise ValueError("DLLP found no layer to gate (every Linear/Conv excluded or only the output layer)")
    return sites


# ---------------------------------------------------------------------------------------------------------
# prior
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def unit_importance(site: GateSite, importance: str = "l2") -> Tensor:
    """Magnitude importance per gated unit (float64, shape ``(units,)``); not invariant to function-preserving
    rescaling (the data-driven ``taylor``/``ablation`` are :func:`~.dllp_prior.function_importance`).

    ``"l2"``: L2 norm of the unit's incoming weights (a row of a ``Linear`` weight, a filter of a conv);
    ``"bn"``: ``|gamma|`` of the paired BatchNorm (L2 for a layer without one). Per-weight gates: ``|w|``.
    """
    if importance not in MAGNITUDE_IMPORTANCES:
        raise ValueError(f"magnitude importance must be one of {MAGNITUDE_IMPORTANCES}, got {importance!r}")
    w = site.layer.weight.detach().double()
    if site.granularity == "weight":
        if importance == "bn":
            raise ValueError("importance='bn' needs unit granularity")
        return w.abs().flatten()
    if importance == "bn" and site.bn is not None and site.bn.weight is not None:
        return site.bn.weight.detach().double().abs()
    if importance == "bn":
        log.debug("DLLP prior: %s has no BatchNorm, using the L2 importance", site.name)
    return w.flatten(1).norm(dim=1)


def _standardised_log(imp: Tensor) -> Tensor:
    """``(log I - mean) / sd`` within one layer (0 for a single unit or a constant layer)."""
    li = imp.clamp_min(1e-30).log()
    if li.numel() < 2:
        return torch.zeros_like(li)
    sd = li.std()
    if not torch.isfinite(sd) or sd < 1e-12:
        return torch.zeros_like(li)
    return (li - li.mean()) / sd


def calibrated_keep_prob(
    scores: Tensor, temperature: float = 1.0, shift: float = 0.0, clip: tuple[float, float] = PRIOR_CLIP
) -> Tensor:
    """``pi = clip(sigmoid(scores / temperature + shift), *clip)`` for standardised log-importances."""
    if temperature <= 0:
        raise ValueError(f"prior temperature must be > 0, got {temperature}")
    return torch.sigmoid(scores / temperature + shift).clamp(clip[0], clip[1])


def _shift_for_density(
    scores: Sequence[Tensor], target: float, temperature: float, clip: tuple[float, float]
) -> float:
    """Common logit shift ``c`` with ``sum_u pi_u(c) / U = target`` (bisection; ``pi`` increases with ``c``)."""
    flat = torch.cat([s.flatten() for s in scores])

    def density(c: float) -> float:
        return float(calibrated_keep_prob(flat, temperature, c, clip).mean())

    lo, hi = -60.0, 60.0
    if not density(lo) - 1e-9 <= target <= density(hi) + 1e-9:
        raise ValueError(
            f"target_density={target} is not reachable with keep-probabilities clipped to {list(clip)} "
            f"(reachable: [{density(lo):.4f}, {density(hi):.4f}])"
        )
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if density(mid) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def prior_keep_prob(
    model: nn.Module | Sequence[GateSite],
    importance: str = "l2",
    target_density: float | None = None,
    *,
    temperature: float = 1.0,
    clip: tuple[float, float] = PRIOR_CLIP,
    granularity: str = "unit",
    exclude: Iterable[str] = (),
    values: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Prior keep-probabilities ``pi_u`` per gate site (float32, keyed by the layer's module name).

    ``pi_u = clip(sigmoid(s_u / temperature + c), 0.05, 0.95)`` with ``s_u`` the within-layer standardised
    log-importance and ``c`` the common shift meeting ``target_density`` (the expected kept fraction over all
    gated units; ``c = 0`` when ``None``). Importances: ``values`` (precomputed per layer, e.g. the
    function-based :func:`~.dllp_prior.function_importance`, floored by :func:`~.dllp_prior.floored`), else the
    magnitude :func:`unit_importance` of ``importance`` (``l2``/``bn``).
    """
    sites = find_gate_sites(model, granularity, exclude) if isinstance(model, nn.Module) else list(model)
    if values is not None:
        scores = [_standardised_log(floored(values[s.name].double())) for s in sites]
    elif importance in FUNCTION_IMPORTANCES:
        raise ValueError(f"importance={importance!r} is measured on data: pass values= (function_importance)")
    else:
        scores = [_standardised_log(unit_importance(s, importance)) for s in sites]
    shift = 0.0
    if target_density is not None:
        if not 0.0 < target_density < 1.0:
            raise ValueError(f"target_density must be in (0, 1), got {target_density}")
        shift = _shift_for_density(scores, float(target_density), temperature, clip)
    return {
        s.name: calibrated_keep_prob(sc, temperature, shift, clip).float() for s, sc in zip(sites, scores)
    }


def log_prior(z: Tensor, pi: Tensor, mean: float = PRIOR_MEAN, std: float = PRIOR_STD) -> Tensor:
    """``sum_u log[pi_u N(z_u; +mean, std^2) + (1 - pi_u) N(z_u; -mean, std^2)]`` per particle.

    Args:
        z: logits, shape ``(M, U)``; pi: keep-probabilities, shape ``(U,)`` in (0, 1).
    Returns:
        shape ``(M,)``, the exact normalised log-density (log-sum-exp of the two components).
    """
    pi = pi.to(z.dtype)
    const = -0.5 * math.log(2 * math.pi) - math.log(std)
    on = pi.log() + const - 0.5 * ((z - mean) / std) ** 2
    off = torch.log1p(-pi) + const - 0.5 * ((z + mean) / std) ** 2
    return torch.logaddexp(on, off).sum(-1)


def sample_prior(
    pi: Tensor,
    n: int,
    generator: torch.Generator | None = None,
    mean: float = PRIOR_MEAN,
    std: float = PRIOR_STD,
) -> Tensor:
    """``n`` draws ``(n, U)`` of the mixture prior: ``z = +-mean + std * eps`` with ``P(+) = pi``."""
    u = torch.rand((n, pi.numel()), generator=generator, dtype=torch.float32)
    eps = torch.randn((n, pi.numel()), generator=generator, dtype=torch.float32)
    sign = torch.where(u < pi.float().cpu(), 1.0, -1.0)
    return sign * mean + std * eps


def gate_values(z: Tensor, tau: float, mode: str = "soft") -> Tensor:
    """Gates from logits: ``sigmoid(z / tau)`` (``soft``), ``1[z > 0]`` (``hard``) or the hard gate with the
    soft gate's gradient (``ste``: ``hard + soft - soft.detach()``)."""
    if mode == "hard":
        return (z > 0).to(z.dtype)
    soft = torch.sigmoid(z / tau)
    if mode == "soft":
        return soft
    if mode == "ste":
        return (z > 0).to(z.dtype) + soft - soft.detach()
    raise ValueError(f"gate mode must be one of {GATE_MODES}, got {mode!r}")


# ---------------------------------------------------------------------------------------------------------
# particles and the batched gated model
# ---------------------------------------------------------------------------------------------------------
class ParticleGates(nn.Module):
    """Gate logits of ``M`` particles: one ``(M, units)`` parameter per gated layer (a block for SVGD)."""

    def __init__(
        self, names: Sequence[str], units: Sequence[int], n_particles: int, init: Mapping[str, Tensor]
    ):
        super().__init__()
        if n_particles < 1:
            raise ValueError(f"n_particles must be >= 1, got {n_particles}")
        self.names = list(names)
        self.n_particles = int(n_particles)
        self.logits = nn.ParameterList()
        for n, u in zip(self.names, units):
            z = init[n].detach().float()
            if tuple(z.shape) != (self.n_particles, u):
                raise ValueError(
                    f"initial logits for {n!r}: shape {tuple(z.shape)} != {(self.n_particles, u)}"
                )
            self.logits.append(nn.Parameter(z.clone()))

    def __getitem__(self, name: str) -> nn.Parameter:
        return self.logits[self.names.index(name)]

    def blocks(self) -> list[nn.Parameter]:
        return list(self.logits)

    def gates(self, tau: float, mode: str = "soft") -> dict[str, Tensor]:
        """Gates ``(M, units)`` per layer."""
        return {n: gate_values(z, tau, mode) for n, z in zip(self.names, self.logits)}


@dataclass
class _Context:
    n: int
    gates: Mapping[str, Tensor]
    saved_momentum: dict[int, float | None] = field(default_factory=dict)


class _Hook:
    """Forward (pre-)hooks of one module: per-particle BatchNorm in training and/or the gate multiply."""

    def __init__(self, owner: DLLPModel, module: nn.Module, site: GateSite | None):
        self.owner = owner
        self.module = module
        self.site = site
        self.is_bn = isinstance(module, BN_TYPES)

    def _particle_bn_active(self, ctx: _Context | None) -> bool:
        return (
            ctx is not None and self.is_bn and self.module.training and ctx.n > 1 and self.owner.particle_bn
        )

    def pre(self, module: nn.Module, args: tuple) -> None:
        ctx = self.owner._ctx
        if self._particle_bn_active(ctx) and module.track_running_stats and module.running_mean is not None:
            ctx.saved_momentum[id(module)] = module.momentum
            module.momentum = 0.0  # the native pass must not move the running statistics

    def post(self, module: nn.Module, args: tuple, out: Tensor) -> Tensor | None:
        ctx = self.owner._ctx
        if ctx is None:
            return None
        if self._particle_bn_active(ctx):
            out = self._particle_batch_norm(ctx, args[0])
        if self.site is None:
            return out
        return self._weight_gated_linear(ctx.n, args[0], ctx.gates[self.site.name], out)

    def _weight_gated_linear(self, n: int, x: Tensor, g: Tensor, out: Tensor) -> Tensor:
        layer = self.site.layer
        w = layer.weight.unsqueeze(0) * g.to(layer.weight.dtype).view(n, *layer.weight.shape)
        xs = x.reshape(n, -1, x.shape[-1])
        o = torch.bmm(xs, w.transpose(1, 2))
        if layer.bias is not None:
            o = o + layer.bias
        return o.reshape(out.shape)

    def _particle_batch_norm(self, ctx: _Context, x: Tensor) -> Tensor:
        """BatchNorm with statistics per particle: ``(n*B, C, *)`` -> ``(B, n*C, *)`` -> one ``batch_norm``."""
        bn, n = self.module, ctx.n
        c = x.shape[1]
        xb = x.unflatten(0, (n, -1)).movedim(0, 1)
        xb = xb.reshape(xb.shape[0], n * c, *xb.shape[3:])
        rm = rv = None
        factor = 0.0
        if id(bn) in ctx.saved_momentum:
            momentum = ctx.saved_momentum.pop(id(bn))
            bn.momentum = momentum
            factor = momentum if momentum is not None else 1.0 / float(bn.num_batches_tracked)
            rm, rv = bn.running_mean.repeat(n), bn.running_var.repeat(n)
        w = bn.weight.repeat(n) if bn.weight is not None else None
        b = bn.bias.repeat(n) if bn.bias is not None else None
        y = F.batch_norm(xb, rm, rv, w, b, training=True, momentum=factor, eps=bn.eps)
        if rm is not None:
            with torch.no_grad():
                bn.running_mean.copy_(rm.view(n, c).mean(0))
                bn.running_var.copy_(rv.view(n, c).mean(0))
        y = y.unflatten(1, (n, c)).movedim(1, 0)
        return y.reshape(x.shape)


class DLLPModel(nn.Module):
    """A network with ``M`` particles of gates evaluated in one batched forward pass.

    ``forward(x)`` with ``x`` of shape ``(B, ...)`` returns logits ``(M, B, C)``: the input is repeated
    ``M`` times along the batch dimension and the hooks gate each particle's slice. :meth:`forward_gates`
    does the same for any gates ``{layer name: (P, units)}`` (e.g. one particle, or hard masks). Calling the
    wrapped ``self.model`` directly runs the plain (ungated) network.
    """

    def __init__(
        self,
        model: nn.Module,
        sites: Sequence[GateSite],
        prior: Mapping[str, Tensor],
        gates: ParticleGates,
        *,
        tau: float = 1.0,
        gate_mode: str = "soft",
        particle_bn: bool = True,
        bn_eval: bool = False,
    ):
        super().__init__()
        if gate_mode not in GATE_MODES:
            raise ValueError(f"gate_mode must be one of {GATE_MODES}, got {gate_mode!r}")
        self.model = model
        self.sites = list(sites)
        self._by_name = {s.name: s for s in self.sites}
        self.particles = gates
        for i, s in enumerate(self.sites):
            self.register_buffer(f"prior_pi_{i}", prior[s.name].detach().float().clone())
            # which particles started with the unit on (for the posterior-shift report: sign flips)
            self.register_buffer(f"init_on_{i}", (gates[s.name].detach() > 0).clone())
        self.tau = float(tau)
        self.gate_mode = gate_mode
        self.particle_bn = bool(particle_bn)
        self.bn_eval = bool(bn_eval)
        self.prior_importance: dict[str, Tensor] | None = None   # function-based importances, when measured
        self._ctx: _Context | None = None
        self._handles: list[Any] = []
        self._install_hooks()

    def train(self, mode: bool = True) -> DLLPModel:
        """``nn.Module.train``; with ``bn_eval`` the wrapped network's BatchNorm layers stay in eval mode (the
        posterior is then over gates of the *given* function: running statistics, as deployed)."""
        super().train(mode)
        if self.bn_eval:
            for m in self.model.modules():
                if isinstance(m, BN_TYPES):
                    m.eval()
        return self

    # hooks --------------------------------------------------------------------------------------------
    def _install_hooks(self) -> None:
        """Per-particle BatchNorm (and per-weight gates) by :class:`_Hook`; unit gates as a multiplier on the
        site (:class:`~prunelab.pruning.units.sites.SiteHook`), after the BatchNorm's hook."""
        by_hook = {s.hook_name: s for s in self.sites}
        for name, module in self.model.named_modules():
            site = by_hook.get(name)
            weight_site = site if site is not None and site.granularity == "weight" else None
            if isinstance(module, BN_TYPES) or weight_site is not None:
                hook = _Hook(self, module, weight_site)
                self._handles.append(module.register_forward_pre_hook(hook.pre))
                self._handles.append(module.register_forward_hook(hook.post))
            if site is not None and site.granularity == "unit":
                self._handles.append(attach(module, self, site.name))

    def multiply(self, key: str, out: Tensor) -> Tensor:
        """The site hook's multiply: each particle's slice ``(n, B, U, ...)`` of ``out`` times its gates of
        site ``key`` (no gates outside :meth:`forward_gates`: the plain network)."""
        ctx = self._ctx
        if ctx is None:
            return out
        site, g, n = self._by_name[key], ctx.gates[key], ctx.n
        o = out.unflatten(0, (n, -1))
        shape = [n] + [1] * (o.dim() - 1)
        cdim = o.dim() - 1 if site.kind == "linear" and site.bn is None else 2
        shape[cdim] = g.shape[1]
        return (o * g.to(o.dtype).view(shape)).flatten(0, 1)

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @contextmanager
    def hooks_removed(self) -> Iterator[nn.Module]:
        """Temporarily remove the hooks (e.g. to deep-copy the plain network)."""
        self._remove_hooks()
        try:
            yield self.model
        finally:
            self._install_hooks()

    # accessors ----------------------------------------------------------------------------------------
    @property
    def n_particles(self) -> int:
        return self.particles.n_particles

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]

    def prior(self) -> dict[str, Tensor]:
        """Prior keep-probabilities ``pi`` per gated layer."""
        return {s.name: getattr(self, f"prior_pi_{i}") for i, s in enumerate(self.sites)}

    def initial_on(self) -> dict[str, Tensor]:
        """``z > 0`` of the particles when they were created, ``(M, units)`` bool per gated layer."""
        return {s.name: getattr(self, f"init_on_{i}") for i, s in enumerate(self.sites)}

    def particle_gates(self, mode: str | None = None) -> dict[str, Tensor]:
        """Current gates ``(M, units)`` (``mode`` defaults to ``self.gate_mode``)."""
        return self.particles.gates(self.tau, mode or self.gate_mode)

    # forward ------------------------------------------------------------------------------------------
    def forward_gates(self, x: Tensor, gates: Mapping[str, Tensor]) -> Tensor:
        """Logits ``(P, B, C)`` of the network under ``P`` gate sets ``{layer name: (P, units)}``."""
        missing = [s.name for s in self.sites if s.name not in gates]
        if missing:
            raise KeyError(f"gates missing for gated layers {missing}")
        n = int(next(iter(gates.values())).shape[0])
        b = x.shape[0]
        self._ctx = _Context(n, gates)
        try:
            out = self.model(x.repeat(n, *([1] * (x.dim() - 1))))
        finally:
            ctx, self._ctx = self._ctx, None
            for module in self.model.modules():
                if id(module) in ctx.saved_momentum:
                    module.momentum = ctx.saved_momentum.pop(id(module))
        return out.unflatten(0, (n, b))

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(M, B, C)`` of all particles in one batched pass."""
        return self.forward_gates(x, self.particle_gates())


def attach_gates(
    model: nn.Module,
    granularity: str = "unit",
    importance: str = "l2",
    n_particles: int = 10,
    *,
    target_density: float | None = None,
    temperature: float = 1.0,
    clip: tuple[float, float] = PRIOR_CLIP,
    init: str = "prior",
    init_std: float = 1.0,
    gate_mode: str = "soft",
    exclude: Iterable[str] = (),
    particle_bn: bool = True,
    generator: torch.Generator | None = None,
    data: Iterable[tuple[Tensor, Tensor]] | None = None,
    bn_eval: bool = False,
    example: Tensor | None = None,
) -> DLLPModel:
    """Wrap a pretrained ``model`` with ``n_particles`` particles of gates (see the module docstring).

    The prior ``pi`` comes from ``importance`` (:func:`prior_keep_prob`): ``l2``/``bn`` from the weights (the
    low-level default here, kept for callers that have no data; ``method=dllp`` defaults to ``taylor``), or
    ``taylor``/``ablation`` measured through the gates on the training batches ``data``
    (:func:`~.dllp_prior.function_importance`). Particles start as prior draws (``init="prior"``) or
    ``N(0, init_std^2)`` (``init="normal"``). ``bn_eval``: BatchNorm layers stay in eval mode (running
    statistics) whatever ``train()`` says (:class:`DLLPModel`). ``model`` is wrapped, not copied. ``example``:
    an input batch, so that a layer is paired with the BatchNorm the forward pass calls after it.
    """
    if importance not in IMPORTANCES:
        raise ValueError(f"importance must be one of {IMPORTANCES}, got {importance!r}")
    if init not in ("prior", "normal"):
        raise ValueError(f"init must be 'prior' or 'normal', got {init!r}")
    sites = find_gate_sites(model, granularity, exclude, example=example)
    device = next(model.parameters()).device
    values = None
    if importance in FUNCTION_IMPORTANCES:
        if data is None:
            raise ValueError(f"importance={importance!r} needs training batches (data=...)")
        flat = {s.name: torch.full((s.units,), 0.5) for s in sites}
        z_flat = {s.name: torch.zeros(1, s.units) for s in sites}
        probe = DLLPModel(model, sites, flat, ParticleGates(list(flat), [s.units for s in sites], 1, z_flat),
                          particle_bn=False).to(device)
        try:
            values = function_importance(probe, data, importance)
        finally:
            probe._remove_hooks()
    prior = prior_keep_prob(sites, importance, target_density, temperature=temperature, clip=clip, values=values)
    if init == "prior":
        z0 = {s.name: sample_prior(prior[s.name], n_particles, generator) for s in sites}
    elif init == "normal":
        z0 = {s.name: init_std * torch.randn((n_particles, s.units), generator=generator) for s in sites}
    else:
        raise ValueError(f"init must be 'prior' or 'normal', got {init!r}")
    gates = ParticleGates([s.name for s in sites], [s.units for s in sites], n_particles, z0)
    dm = DLLPModel(model, sites, prior, gates, gate_mode=gate_mode, particle_bn=particle_bn, bn_eval=bn_eval)
    if values is not None:
        dm.prior_importance = {n: v.clone() for n, v in values.items()}
    return dm.to(device)


# ---------------------------------------------------------------------------------------------------------
# controller
# ---------------------------------------------------------------------------------------------------------
def _batches(data: Any) -> Iterator[tuple[Tensor, Tensor]]:
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor):
        yield data
        return
    for batch in data:
        yield batch[0], batch[1]


class DLLP:
    """Training-loop-agnostic controller of a :class:`DLLPModel`.

    Per step (:meth:`train_step` does all of it)::

        logits = dllp.model(x)                       # (M, B, C), one batched pass
        loss = dllp.loss_weights(logits, y)          # CE averaged over particles, for W
        dllp.svgd_step(logits, y, n_train)           # z.grad = -phi (autograd.grad: W grads untouched)
        loss.backward(inputs=dllp.weight_parameters())
        z_opt.step(); w_opt.step()

    ``loss.backward()`` without ``inputs`` would also add ``d loss / d z`` to ``z.grad``; calling
    :meth:`svgd_step` after such a backward is also correct, because it overwrites ``z.grad``.
    """

    def __init__(
        self,
        model: DLLPModel,
        n_train: int | None = None,
        *,
        tau_start: float = 1.0,
        tau_end: float = 0.1,
        tau_schedule: str = "geometric",
        data_weight: float = 1.0,
        density: float | None = None,
        dual_lr: float = 0.05,
    ):
        if density is not None and not 0.0 < density < 1.0:
            raise ValueError(f"density must be in (0, 1) or None, got {density}")
        if dual_lr < 0:
            raise ValueError(f"dual_lr must be >= 0, got {dual_lr}")
        if tau_schedule not in ("geometric", "linear"):
            raise ValueError(f"tau_schedule must be 'geometric' or 'linear', got {tau_schedule!r}")
        if not (tau_start > 0 and tau_end > 0):
            raise ValueError("temperatures must be > 0")
        self.model = model
        self.n_train = n_train
        self.tau_start, self.tau_end, self.tau_schedule = float(tau_start), float(tau_end), tau_schedule
        self.data_weight = float(data_weight)
        self.density = None if density is None else float(density)
        self.dual_lr = float(dual_lr)
        self.lam = 0.0   # budget multiplier (dual variable), >= 0; see :meth:`log_budget`
        self.set_progress(0.0)

    # parameters and schedule --------------------------------------------------------------------------
    def particle_parameters(self) -> list[nn.Parameter]:
        return self.model.particles.blocks()

    def weight_parameters(self) -> list[nn.Parameter]:
        """The shared network weights ``W`` (trainable parameters of the wrapped network)."""
        return [p for p in self.model.model.parameters() if p.requires_grad]

    def particle_optimizer(self, lr: float = 1e-2) -> torch.optim.Optimizer:
        """Adam over the gate logits, to be fed ``z.grad = -phi``."""
        return torch.optim.Adam(self.particle_parameters(), lr=lr)

    def set_progress(self, frac: float) -> float:
        """Set the gate temperature for training progress ``frac`` in [0, 1]; returns ``tau``.

        geometric: ``tau = tau_start (tau_end / tau_start)^frac``; linear: ``tau_start + frac (tau_end -
        tau_start)``.
        """
        f = min(max(float(frac), 0.0), 1.0)
        if self.tau_schedule == "geometric":
            tau = self.tau_start * (self.tau_end / self.tau_start) ** f
        else:
            tau = self.tau_start + f * (self.tau_end - self.tau_start)
        self.model.tau = tau
        return tau

    @property
    def tau(self) -> float:
        return self.model.tau

    # densities ----------------------------------------------------------------------------------------
    def loss_weights(self, logits: Tensor, y: Tensor) -> Tensor:
        """Cross-entropy for ``W``: mean over particles of the batch-mean CE (logits ``(M, B, C)``)."""
        m, b, c = logits.shape
        return F.cross_entropy(logits.reshape(m * b, c), y.repeat(m))

    @staticmethod
    def log_likelihood(logits: Tensor, y: Tensor) -> Tensor:
        """``sum_b log p(y_b | x_b, z_m)`` per particle, shape ``(M,)``."""
        m, b, c = logits.shape
        nll = F.cross_entropy(logits.reshape(m * b, c), y.repeat(m), reduction="none")
        return -nll.view(m, b).sum(1)

    def log_prior(self, zs: Sequence[Tensor] | None = None) -> Tensor:
        """``log p(z_m)`` per particle ``(M,)``: the mixture prior summed over every gated layer."""
        zs = self.particle_parameters() if zs is None else zs
        pis = self.model.prior()
        return sum(log_prior(z, pis[n]) for n, z in zip(self.model.site_names, zs))

    def soft_density(self, zs: Sequence[Tensor] | None = None) -> Tensor:
        """Per particle, the mean soft gate ``sum_u sigmoid(z_u / tau) / U`` over every gated unit, ``(M,)``."""
        zs = self.particle_parameters() if zs is None else zs
        total = sum(torch.sigmoid(z / self.tau).sum(1) for z in zs)
        return total / sum(z.shape[1] for z in zs)

    @torch.no_grad()
    def hard_density(self) -> Tensor:
        """Per particle, the fraction of gated units with ``z > 0``, ``(M,)``."""
        zs = self.particle_parameters()
        return sum((z > 0).double().sum(1) for z in zs) / sum(z.shape[1] for z in zs)

    def log_budget(self, zs: Sequence[Tensor] | None = None) -> Tensor:
        """The unit-budget tilt ``-lam * data_weight * N * soft_density(z)`` per particle, ``(M,)`` (0 without a
        ``density`` target or before the first :meth:`update_dual`)."""
        zs = self.particle_parameters() if zs is None else zs
        if self.density is None or self.lam == 0.0:
            return torch.zeros(zs[0].shape[0], dtype=zs[0].dtype, device=zs[0].device)
        n = float(self.n_train or 0)
        return -self.lam * self.data_weight * n * self.soft_density(zs)

    def log_prior_target(self, zs: Sequence[Tensor] | None = None) -> Tensor:
        """Everything of ``log p(z | D)`` but the data term: :meth:`log_prior` + :meth:`log_budget`."""
        zs = self.particle_parameters() if zs is None else zs
        return self.log_prior(zs) + self.log_budget(zs)

    @torch.no_grad()
    def update_dual(self) -> float:
        """Dual ascent on the budget: ``lam <- max(0, lam + dual_lr (mean_m hard_density_m - density))``."""
        if self.density is not None and self.dual_lr > 0:
            excess = float(self.hard_density().mean()) - self.density
            self.lam = max(0.0, self.lam + self.dual_lr * excess)
        return self.lam

    def log_posterior(self, logits: Tensor | None, y: Tensor | None, n_train: int | None = None) -> Tensor:
        """``(N / B) * data_weight * log-likelihood + log prior + log budget`` per particle (unnormalised)."""
        lp = self.log_prior_target()
        if logits is None or self.data_weight == 0.0:
            return lp
        n = n_train if n_train is not None else self.n_train
        if n is None:
            raise ValueError("n_train (number of training examples) is needed for the likelihood scale N / B")
        return lp + (self.data_weight * n / logits.shape[1]) * self.log_likelihood(logits, y)

    # SVGD ---------------------------------------------------------------------------------------------
    def svgd_step(
        self, logits: Tensor | None = None, y: Tensor | None = None, n_train: int | None = None
    ) -> dict[str, Tensor]:
        """Set ``z.grad = -phi`` on every gate-logit block (SVGD direction of ``log p(z | D)``).

        ``logits``: ``(M, B, C)`` from ``self.model(x)`` in the current graph; ``None`` = prior only.
        The gradients come from ``torch.autograd.grad`` (graph retained; ``W.grad`` untouched).
        """
        zs = self.particle_parameters()
        logp = self.log_posterior(logits, y, n_train)
        grads = torch.autograd.grad(logp.sum(), zs, retain_graph=logits is not None, allow_unused=True)
        grads = [torch.zeros_like(z) if g is None else g for z, g in zip(zs, grads)]
        phis = svgd_direction_blocks([z.detach() for z in zs], grads)
        for z, phi in zip(zs, phis):
            z.grad = -phi
        return {
            "log_posterior": logp.detach().mean(),
            "phi_norm": torch.sqrt(sum(p.pow(2).sum() for p in phis)),
            "tau": torch.tensor(self.tau),
        }

    def backward(self, logits: Tensor, y: Tensor, n_train: int | None = None) -> Tensor:
        """SVGD gradients on ``z`` (``z.grad = -phi``) and ``d loss / d W`` accumulated into ``W.grad``, from
        ONE backward pass; returns the detached :meth:`loss_weights`.

        Both gradients are multiples of the gradient of ``S = sum_m sum_b log p(y_b | x_b, z_m)``:
        ``d loss_W / dW = -dS/dW / (M B)`` and ``grad_z log p(z | D) = data_weight (N / B) dS/dz + grad log
        p(z)``, so one ``autograd.grad`` of ``S`` serves both (about half the cost of two backward passes).
        """
        m, b, _ = logits.shape
        zs = self.particle_parameters()
        ws = self.weight_parameters()
        ll = self.log_likelihood(logits, y)
        n = n_train if n_train is not None else self.n_train
        if n is None and self.data_weight != 0.0:
            raise ValueError("n_train (number of training examples) is needed for the likelihood scale N / B")
        grads = torch.autograd.grad(ll.sum(), zs + ws, allow_unused=True)
        with torch.enable_grad():
            zd = [z.detach().requires_grad_(True) for z in zs]
            gp = torch.autograd.grad(self.log_prior_target(zd).sum(), zd)
        scale = self.data_weight * (n or 0) / b
        gz = [gp_l if g is None else scale * g + gp_l for g, gp_l in zip(grads[: len(zs)], gp)]
        for z, phi in zip(zs, svgd_direction_blocks([z.detach() for z in zs], gz)):
            z.grad = -phi
        for w, g in zip(ws, grads[len(zs) :]):
            if g is None:
                continue
            gw = -g / (m * b)
            w.grad = gw if w.grad is None else w.grad + gw
        return (-ll.sum() / (m * b)).detach()

    def train_step(
        self,
        x: Tensor,
        y: Tensor,
        z_opt: torch.optim.Optimizer,
        w_opt: torch.optim.Optimizer | None = None,
        n_train: int | None = None,
    ) -> dict[str, Tensor]:
        """One SVGD step on the particles and (if ``w_opt``) one optimiser step on ``W``: one forward, one
        backward (:meth:`backward`); without ``w_opt`` only the particles' gradients are computed."""
        logits = self.model(x)
        if w_opt is None:
            loss = self.loss_weights(logits, y).detach()
            self.svgd_step(logits, y, n_train)
        else:
            w_opt.zero_grad(set_to_none=True)
            loss = self.backward(logits, y, n_train)
            w_opt.step()
        z_opt.step()
        self.update_dual()
        return {"loss": loss, "tau": torch.tensor(self.tau)}

    # decision -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def inclusion_probs(self) -> dict[str, Tensor]:
        """``rho_u`` = fraction of particles with ``z_u > 0``, per gated layer."""
        return {
            n: (z > 0).double().mean(0) for n, z in zip(self.model.site_names, self.particle_parameters())
        }

    @torch.no_grad()
    def inclusion_se(self) -> dict[str, Tensor]:
        """Binomial (Monte-Carlo) standard error ``sqrt(rho (1 - rho) / M)`` of ``rho``."""
        m = self.model.n_particles
        return {n: (r * (1 - r) / m).sqrt() for n, r in self.inclusion_probs().items()}

    @torch.no_grad()
    def unit_masks(self, threshold: float = 0.5, target_sparsity: float | None = None) -> dict[str, Tensor]:
        """Kept units (bool, ``(units,)`` per gated layer).

        Default: keep iff ``rho >= threshold``. With ``target_sparsity`` (fraction of gated units removed,
        over all gated layers together): keep the ``round((1 - s) U)`` units of highest ``rho`` (ties by the
        particles' mean logit); a layer left empty keeps its best unit so the network stays connected.
        """
        rho = self.inclusion_probs()
        if target_sparsity is None:
            return {n: r >= threshold for n, r in rho.items()}
        if not 0.0 <= target_sparsity < 1.0:
            raise ValueError(f"target_sparsity must be in [0, 1), got {target_sparsity}")
        names = list(rho)
        zbar = torch.cat([z.mean(0) for z in self.particle_parameters()]).cpu()
        r = torch.cat([rho[n] for n in names]).cpu()
        order = torch.argsort(zbar, descending=True, stable=True)
        order = order[torch.argsort(r[order], descending=True, stable=True)]
        keep = torch.zeros_like(r, dtype=torch.bool)
        keep[order[: int(round((1.0 - target_sparsity) * r.numel()))]] = True
        out, start = {}, 0
        for n in names:
            k = keep[start : start + rho[n].numel()].clone()
            if not k.any():
                k[torch.argmax(zbar[start : start + rho[n].numel()])] = True
            out[n] = k.to(rho[n].device)
            start += rho[n].numel()
        return out

    @torch.no_grad()
    def masks(
        self,
        threshold: float = 0.5,
        target_sparsity: float | None = None,
        weights_only: bool = False,
        keep: Mapping[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Bool masks per parameter name (True = kept), each of its parameter's shape.

        A removed unit zeroes its layer's weight row/filter and bias and, with a paired BatchNorm, its
        ``gamma`` and ``beta`` (so the channel's output is exactly 0); ``weights_only`` returns the layer
        weights only. Per-weight gates mask the weights themselves. ``keep``: unit masks to use instead of
        :meth:`unit_masks` ``(threshold, target_sparsity)``.
        """
        keep = self.unit_masks(threshold, target_sparsity) if keep is None else keep
        out: dict[str, Tensor] = {}
        for site in self.model.sites:
            k = keep[site.name]
            w = site.layer.weight
            if site.granularity == "weight":
                out[f"{site.name}.weight"] = k.view(w.shape).clone()
                continue
            out[f"{site.name}.weight"] = k.view(-1, *([1] * (w.dim() - 1))).expand(w.shape).clone()
            if weights_only:
                continue
            if site.layer.bias is not None:
                out[f"{site.name}.bias"] = k.clone()
            if site.bn is not None:
                for p in ("weight", "bias"):
                    if getattr(site.bn, p, None) is not None:
                        out[f"{site.bn_name}.{p}"] = k.clone()
        return out

    @staticmethod
    def hard_gates(unit_masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """0/1 gates ``(1, units)`` for :meth:`DLLPModel.forward_gates` from :meth:`unit_masks`."""
        return {n: k.float().unsqueeze(0) for n, k in unit_masks.items()}

    @torch.no_grad()
    def pruned_model(
        self,
        threshold: float = 0.5,
        target_sparsity: float | None = None,
        keep: Mapping[str, Tensor] | None = None,
    ) -> nn.Module:
        """A deep copy of the plain network with the removed units' parameters set to 0 (no hooks)."""
        with self.model.hooks_removed() as plain:
            net = copy.deepcopy(plain)
        for name, m in self.masks(threshold, target_sparsity, keep=keep).items():
            p = net.get_parameter(name)
            p.mul_(m.to(p.dtype))
        return net

    # posterior vs prior ------------------------------------------------------------------------------
    @torch.no_grad()
    def posterior_shift(self, keep: Mapping[str, Tensor] | None = None) -> dict[str, Any]:
        """How far the particles' posterior moved from the prior (JSON-serialisable).

        Per layer and over all gated units: ``mean |rho - pi|``; ``mode_flip_fraction``, the fraction of units
        with ``1[rho >= 0.5] != 1[pi >= 0.5]``; ``kl`` = mean ``KL(Bern(rho) || Bern(pi))`` and ``js`` = mean
        Jensen-Shannon divergence (nats; ``rho`` clipped to [1e-6, 1 - 1e-6] for the KL);
        ``particle_flip_fraction``, the fraction of (particle, unit) signs that differ from the particles'
        initial signs. With ``keep`` (the decided unit masks, ``k`` units kept): ``decision_vs_prior_fraction``,
        the fraction of units whose decision differs from keeping the ``k`` units of highest ``pi`` (the prior's
        own decision at the same unit count; ties in ``pi`` by unit order).
        """
        rho, pi, init = self.inclusion_probs(), self.model.prior(), self.model.initial_on()
        zs = dict(zip(self.model.site_names, self.particle_parameters()))

        def stats(r: Tensor, p: Tensor, z: Tensor, z0: Tensor) -> dict[str, float]:
            r, p = r.double().cpu(), p.double().cpu()
            rc = r.clamp(1e-6, 1 - 1e-6)
            kl = rc * (rc / p).log() + (1 - rc) * ((1 - rc) / (1 - p)).log()
            mid = 0.5 * (rc + p)

            def kl_to_mid(a: Tensor) -> Tensor:
                return a * (a / mid).log() + (1 - a) * ((1 - a) / (1 - mid)).log()

            js = 0.5 * (kl_to_mid(rc) + kl_to_mid(p))
            return {
                "units": int(r.numel()),
                "mean_abs_diff": float((r - p).abs().mean()),
                "mode_flip_fraction": float(((r >= 0.5) != (p >= 0.5)).double().mean()),
                "kl": float(kl.mean()),
                "js": float(js.mean()),
                "particle_flip_fraction": float(((z.detach() > 0).cpu() != z0.cpu()).double().mean()),
            }

        names = list(rho)
        layers = {n: stats(rho[n], pi[n], zs[n], init[n]) for n in names}
        cat = lambda d: torch.cat([d[n].flatten().cpu() for n in names])  # noqa: E731
        zcat = torch.cat([zs[n].detach().cpu() for n in names], 1)
        out: dict[str, Any] = {**stats(cat(rho), cat(pi), zcat, torch.cat([init[n].cpu() for n in names], 1))}
        if keep is not None:
            kflat = torch.cat([keep[n].flatten().cpu() for n in names])
            pflat = cat(pi)
            prior_keep = torch.zeros_like(kflat)
            prior_keep[torch.argsort(pflat, descending=True, stable=True)[: int(kflat.sum())]] = True
            out["decision_vs_prior_fraction"] = float((prior_keep != kflat).double().mean())
        out["layers"] = layers
        return out

    # reliability --------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(
        self,
        data: Any,
        deployed_model: nn.Module | None = None,
        threshold: float = 0.5,
        target_sparsity: float | None = None,
        keep: Mapping[str, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-particle probabilities ``(M, N, C)`` (hard gates ``1[z > 0]``, eval mode), labels ``(N,)``
        and the deployed network's probabilities ``(N, C)`` (hard unit masks unless ``deployed_model``)."""
        net = self.model
        was_training = net.training
        net.eval()
        dev = next(net.model.parameters()).device
        gates = net.particle_gates("hard")
        keep = self.unit_masks(threshold, target_sparsity) if keep is None else keep
        deploy = {k: v.to(dev) for k, v in self.hard_gates(keep).items()}
        probs, ys, dep = [], [], []
        try:
            for x, y in _batches(data):
                x, y = x.to(dev), y.to(dev)
                probs.append(net.forward_gates(x, gates).softmax(-1).cpu())
                if deployed_model is None:
                    dep.append(net.forward_gates(x, deploy)[0].softmax(-1).cpu())
                else:
                    dep.append(deployed_model(x).softmax(-1).cpu())
                ys.append(y.cpu())
        finally:
            net.train(was_training)
        if not ys:
            raise ValueError("reliability: no batches")
        return torch.cat(probs, 1), torch.cat(ys), torch.cat(dep)

    @torch.no_grad()
    def reliability(
        self,
        data: Any,
        deployed_model: nn.Module | None = None,
        threshold: float = 0.5,
        target_sparsity: float | None = None,
        keep: Mapping[str, Tensor] | None = None,
    ) -> dict[str, Any]:
        """JSON-serialisable reliability report (see the module docstring).

        ``data``: an iterable of ``(x, y)`` batches (a DataLoader) or a single ``(x, y)`` pair.
        """
        keep = self.unit_masks(threshold, target_sparsity) if keep is None else keep
        keep_masks = keep
        probs, y, dep = self.predict(data, deployed_model, keep=keep)
        rho, se = self.inclusion_probs(), self.inclusion_se()
        flat = torch.cat([r.cpu() for r in rho.values()])
        zs = torch.cat([z.detach().cpu() for z in self.particle_parameters()], 1)
        part_sp = (zs <= 0).double().mean(1)
        keep = torch.cat([keep[n].cpu() for n in rho])
        ens = ensemble_metrics(probs, y)
        undecided = (flat > 0.2) & (flat < 0.8)
        return {
            "n_particles": self.model.n_particles,
            "tau": float(self.tau),
            "n_gated_units": int(flat.numel()),
            "rho": {n: r.cpu().tolist() for n, r in rho.items()},
            "rho_se": {n: s.cpu().tolist() for n, s in se.items()},
            "undecided_fraction": float(undecided.double().mean()),
            "undecided_count": int(undecided.sum()),
            "particle_sparsity": part_sp.tolist(),
            "particle_sparsity_mean": float(part_sp.mean()),
            "particle_sparsity_sd": float(part_sp.std()) if part_sp.numel() > 1 else 0.0,
            "deployed_sparsity": float(1.0 - keep.double().mean()),
            "ensemble": ens,
            "deployed_acc": float((dep.argmax(-1) == y).double().mean()),
            "agreement": agreement(dep, probs.mean(0)),
            "posterior_shift": self.posterior_shift(keep=keep_masks),
        }
