"""BMRS: Bayesian model reduction for structured pruning (Wright, Igel, Selvan, NeurIPS 2024, arXiv 2406.01345).

Every prunable unit (a neuron, a conv filter's output map, a hidden dimension) gets a multiplicative noise
variable ``theta`` on ``[a, b]`` with a truncated log-uniform prior and a truncated log-normal posterior
(Neklyudov et al. 2017). After (or during) variational training, Bayesian model reduction gives, in closed
form, the change in variational free energy ``Delta F`` obtained by replacing the prior of one unit with a
*reduced* prior concentrated near ``theta = 0``; a unit is pruned iff ``Delta F >= 0`` (no threshold to tune).

Public API (training-loop agnostic; the Lightning wiring lives elsewhere):

- :class:`LogNormalNoise` -- the noise layer; :func:`insert_noise` / :func:`remove_noise` attach it to a model.
- :func:`kl_loss` -- the KL term of the loss, with the reference code's or the true ELBO scaling.
- :func:`delta_f_n` (BMRS_N), :func:`delta_f_u` (BMRS_U), :func:`prune_scores` (all rules incl. baselines).
- :class:`BMRSPruner` -- recomputes unit masks from the current posteriors (continuous pruning), statistics.
- :func:`rank_units` -- units ordered from most to least prunable, for post-training sweeps.
- :func:`unit_param_counts`, :func:`param_masks` -- parameters owned by units, in prunelab's mask convention
  (from the dependency groups of :mod:`prunelab.pruning.units`).

Placement choice (:func:`insert_noise`): the noise is a multiplier on the layer sites of
:mod:`prunelab.pruning.units.sites`; the noise module is registered as a child ``bmrs_noise`` of the module
whose output it multiplies and applied by a site hook (a forward hook) on that module. Unlike wrapping the module in
``nn.Sequential(module, noise)``, this leaves every existing parameter name unchanged (``layer1.0.bn1.weight``
stays ``layer1.0.bn1.weight``), so checkpoints of the pretrained model still load, prunelab's masks keyed by
parameter name stay valid, and ``copy.deepcopy``/``torch.save`` keep working (the hook holds the noise module,
which ``deepcopy`` maps to the copy's).

Noise sampling: the authors' code (``modules/layers.py``, ``reparameterize(x.shape)``) draws an independent
``theta`` for every element of the activation tensor (per example, and per spatial position for conv maps)
with ``(mu, sigma)`` shared per unit; that is the default here (``sample_mode="element"``). ``"sample"`` draws
one ``theta`` per unit and example (shared over spatial positions/tokens) and ``"batch"`` one per unit per
forward pass, broadcast over the batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from prunelab.pruning.bayes import lognormal as ln
from prunelab.pruning.units.groups import build_groups
from prunelab.pruning.units.layers import BN_TYPES, UNIT_TYPES
from prunelab.pruning.units.sites import LayerSite, attach, layer_sites, site_param_masks, strip_site_hooks

logger = logging.getLogger(__name__)

__all__ = [
    "METHOD_RULES",
    "RULES",
    "TRAINED_L2",
    "authors_cut_weights",
    "authors_params_removed",
    "is_plain_chain",
    "zero_cut_weights",
    "BMRSPruner",
    "LogNormalNoise",
    "delta_f_n",
    "delta_f_u",
    "find_noise",
    "insert_noise",
    "kl_loss",
    "param_masks",
    "prune_scores",
    "rank_units",
    "remove_noise",
    "unit_param_counts",
]

RULES = ("bmrs_n", "bmrs_u", "snr", "expected_theta")  # decided by each unit's posterior, every epoch
# The authors' L2 baseline (their LogUniformL2NormPruningLayer with --compression_percentage_file): the same
# noise and KL while training, then a cut at the end by the L2 norm of each unit's incoming weights (and, with
# BMRSPruner's l2_epoch_threshold, one after every epoch too).
TRAINED_L2 = "l2_norm"
METHOD_RULES = RULES + (TRAINED_L2,)
# Delta F_N as the authors' released code computes it (the default: it reproduces the published compression)
# or as the paper's Eq. 8 writes it (exact; larger by 1/2 log 2 pi, see delta_f_n).
DELTA_F_N_VARIANTS = ("code", "paper")
NOISE_ATTR = "bmrs_noise"
SAMPLE_MODES = ("element", "sample", "batch")
PLACEMENTS = ("auto", "batchnorm", "activation", "transformer")
TRANSFORMER_SUFFIXES = ("mlp.fc2", "output.dense")

# ----------------------------------------------------------------------------------------------------------
# The noise layer
# ----------------------------------------------------------------------------------------------------------


class LogNormalNoise(nn.Module):
    """Multiplicative log-normal noise ``theta`` per unit, ``log theta ~ N(mu, sigma^2)`` truncated to
    ``[log a, log b]`` (Neklyudov et al. 2017; BMRS Sec. 3).

    Parameters ``mu`` and ``log_sigma`` have shape ``(units,)`` (initialised to 0 and -5, the paper's values);
    ``log_sigma`` is clamped to ``log_sigma_bounds`` (the reference code's [-20, 5]) wherever ``sigma`` is used.
    The boolean buffer ``mask`` (True = kept) zeroes pruned units in both modes. ``dim`` is the unit axis of the
    input (1 for ``N x C x H x W`` and ``N x C``, -1 for ``N x T x D``).

    Training: ``x * theta`` with ``theta`` sampled by the inverse-CDF reparameterisation
    (:func:`lognormal.sample_log_theta`), granularity set by ``sample_mode`` (see module docstring).
    Evaluation: ``x * E[theta]``.
    """

    def __init__(
        self,
        units: int,
        dim: int = 1,
        log_a: float = -20.0,
        log_b: float = 0.0,
        init_mu: float = 0.0,
        init_log_sigma: float = -5.0,
        sample_mode: str = "element",
        log_sigma_bounds: tuple[float, float] = (-20.0, 5.0),
    ) -> None:
        super().__init__()
        if not log_a < log_b:
            raise ValueError(f"need log_a < log_b, got {log_a}, {log_b}")
        if sample_mode not in SAMPLE_MODES:
            raise ValueError(f"sample_mode must be one of {SAMPLE_MODES}, got {sample_mode!r}")
        self.units, self.dim, self.log_a, self.log_b = int(units), int(dim), float(log_a), float(log_b)
        self.sample_mode = sample_mode
        self.log_sigma_bounds = (float(log_sigma_bounds[0]), float(log_sigma_bounds[1]))
        self.attached_to: str | None = None  # name of the module whose output this noise multiplies
        self.site: LayerSite | None = None    # the layer site whose units it multiplies
        self.mu = nn.Parameter(torch.full((self.units,), float(init_mu)))
        self.log_sigma = nn.Parameter(torch.full((self.units,), float(init_log_sigma)))
        self.register_buffer("mask", torch.ones(self.units, dtype=torch.bool))

    def extra_repr(self) -> str:
        return (
            f"units={self.units}, dim={self.dim}, log_a={self.log_a}, log_b={self.log_b}, "
            f"sample_mode={self.sample_mode!r}"
        )

    def sigma(self) -> torch.Tensor:
        """``exp(clamp(log_sigma))`` (differentiable inside the clamp range)."""
        return self.log_sigma.clamp(*self.log_sigma_bounds).exp()

    def posterior64(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, sigma)`` in float64, the precision used for every closed-form quantity."""
        return self.mu.double(), self.sigma().double()

    def expected_theta(self) -> torch.Tensor:
        """``E[theta]`` per unit (float64), see :func:`lognormal.expected_theta`."""
        return ln.expected_theta(*self.posterior64(), self.log_a, self.log_b)

    def std_theta(self) -> torch.Tensor:
        """``std[theta]`` per unit (float64), see :func:`lognormal.std_theta`."""
        return ln.std_theta(*self.posterior64(), self.log_a, self.log_b)

    def snr(self) -> torch.Tensor:
        """``E[theta] / std[theta]`` per unit (float64)."""
        return ln.snr(*self.posterior64(), self.log_a, self.log_b)

    def kl(self) -> torch.Tensor:
        """``KL(q || p)`` per unit (float64, differentiable), see :func:`lognormal.kl_to_log_uniform`."""
        return ln.kl_to_log_uniform(*self.posterior64(), self.log_a, self.log_b)

    def _view_shape(self, x: torch.Tensor) -> list[int]:
        d = self.dim % x.ndim
        if x.shape[d] != self.units:
            raise ValueError(
                f"LogNormalNoise({self.units} units, dim={self.dim}) got input of shape {tuple(x.shape)}"
            )
        shape = [1] * x.ndim
        shape[d] = self.units
        return shape

    def _noise_shape(self, x: torch.Tensor, view: list[int]) -> list[int]:
        if self.sample_mode == "element":
            return list(x.shape)
        if self.sample_mode == "sample":
            return [x.shape[0], *view[1:]]
        return view

    def _needs_float64(self, mu: torch.Tensor, sigma: torch.Tensor) -> bool:
        """Sampling runs in the parameters' dtype unless some unit's truncation interval lies far in one tail
        (``|alpha|, |beta| > 1e4``, same sign: ``log p`` is then ~ ``-beta^2/2`` and float32 loses the sample's
        offset from the bound), in which case the whole draw is done in float64."""
        if mu.dtype == torch.float64:
            return False
        alpha, beta = ln.standardized_bounds(mu, sigma, self.log_a, self.log_b)
        return bool(((alpha * beta > 0) & (torch.minimum(alpha.abs(), beta.abs()) > 1e4)).any())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        view = self._view_shape(x)
        keep = self.mask.view(view)
        if self.training:
            mu, sigma = self.mu, self.sigma()
            if self._needs_float64(mu.detach(), sigma.detach()):
                mu, sigma = mu.double(), sigma.double()
            mu, sigma = mu.view(view), sigma.view(view)
            u = torch.rand(self._noise_shape(x, view), device=x.device, dtype=mu.dtype)
            theta = ln.sample_log_theta(mu, sigma, self.log_a, self.log_b, u).exp()
        else:
            theta = self.expected_theta().view(view)
        return x * (theta * keep).to(x.dtype)

    def multiply(self, key, output: torch.Tensor) -> torch.Tensor:
        """The site hook's multiply (:class:`~prunelab.pruning.units.sites.SiteHook`): ``output`` times the noise."""
        return self(output)


# ----------------------------------------------------------------------------------------------------------
# Insertion into models
# ----------------------------------------------------------------------------------------------------------


def _resolve_placement(model: nn.Module, placement: str) -> str:
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if placement != "auto":
        return placement
    if any(isinstance(m, BN_TYPES) for m in model.modules()):
        return "batchnorm"
    if any(_is_transformer_target(n, m) for n, m in model.named_modules()):
        return "transformer"
    return "activation"


def _is_transformer_target(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and name.endswith(TRANSFORMER_SUFFIXES)


def noise_targets(model: nn.Module, mode: str, example: torch.Tensor | None = None) -> list[tuple[str, LayerSite]]:
    """``(module the noise multiplies, its layer site)`` for a resolved placement, from the layer sites of
    :func:`~prunelab.pruning.units.sites.layer_sites` (the classifier never gets noise):

    - ``batchnorm``: after the BatchNorm of every site that has one (the reference code's choice for ResNets);
    - ``activation``: after the first activation that follows each layer (Linear -> ReLU -> noise); an
      activation module used at several places of the forward pass cannot carry a per-layer noise and raises;
    - ``transformer``: per hidden dimension at the output of each transformer MLP (``*.mlp.fc2`` in timm,
      ``*.output.dense`` in HF ViT, where the reference code places it).

    ``example``: an input batch; the sites then follow the forward pass's order (:func:`layer_sites`)."""
    out = []
    for site in layer_sites(model, example=example):
        if mode == "batchnorm":
            if site.norm is not None and isinstance(model.get_submodule(site.norm), BN_TYPES):
                out.append((site.norm, site))
        elif mode == "activation":
            if site.activation is None:
                continue
            if site.activation_shared:
                raise ValueError(
                    f"activation {site.activation!r} is shared by several layers; give each layer its own "
                    "activation module or use placement='batchnorm'"
                )
            out.append((site.activation, site))
        elif _is_transformer_target(site.layer, model.get_submodule(site.layer)):
            out.append((site.layer, site))
    return out


def insert_noise(model: nn.Module, placement: str = "auto", example: torch.Tensor | None = None,
                 **noise_kwargs) -> dict[str, LogNormalNoise]:
    """Attach a :class:`LogNormalNoise` to every prunable unit group of ``model``; return ``{name: noise}``.

    ``placement``: ``"batchnorm"`` (after every BatchNorm: ResNets, VGG-BN, as in the reference code),
    ``"activation"`` (after the non-linearity following each Linear/Conv: MLPs, LeNets), ``"transformer"``
    (per hidden dimension at each MLP block output), or ``"auto"`` (batchnorm if the model has BatchNorm, else
    transformer if it has ``*.mlp.fc2``/``*.output.dense`` Linears, else activation). The classifier (last
    Linear/Conv) never gets noise. Each noise is registered as child ``bmrs_noise`` of the target module and
    applied by a forward hook (see module docstring); names are ``"<target>.bmrs_noise"``.
    ``noise_kwargs`` go to :class:`LogNormalNoise` (``log_a``, ``log_b``, ``sample_mode``, ...). ``example``:
    an input batch, so that "the activation after a layer" is the one the forward pass calls after it.
    """
    mode = _resolve_placement(model, placement)
    targets = noise_targets(model, mode, example)
    if not targets:
        raise ValueError(
            f"insert_noise(placement={placement!r}): no place for noise found in {type(model).__name__}"
        )
    ref = next(model.parameters(), None)
    noises: dict[str, LogNormalNoise] = {}
    for name, site in targets:
        module = model.get_submodule(name)
        units = model.get_submodule(site.norm).num_features if mode == "batchnorm" else site.units
        dim = {"batchnorm": 1, "activation": site.dim}.get(mode, -1)
        if hasattr(module, NOISE_ATTR):
            raise ValueError(f"module {name!r} already carries a {NOISE_ATTR}; call remove_noise first")
        noise = LogNormalNoise(units, dim=dim, **noise_kwargs)
        if ref is not None:
            noise.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
        noise.attached_to, noise.site = name, site
        module.add_module(NOISE_ATTR, noise)
        attach(module, noise)
        noises[f"{name}.{NOISE_ATTR}" if name else NOISE_ATTR] = noise
    logger.info(
        "inserted %d noise layers (%s placement, %d units)",
        len(noises),
        mode,
        sum(n.units for n in noises.values()),
    )
    return noises


def find_noise(model: nn.Module) -> dict[str, LogNormalNoise]:
    """The noise modules of ``model`` (e.g. after ``copy.deepcopy``), keyed as :func:`insert_noise` does."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LogNormalNoise)}


def remove_noise(model: nn.Module) -> None:
    """Undo :func:`insert_noise`: drop the hooks and the ``bmrs_noise`` children."""
    for module in model.modules():
        noise = module._modules.get(NOISE_ATTR)
        if isinstance(noise, LogNormalNoise):
            strip_site_hooks(module, noise)
            del module._modules[NOISE_ATTR]


# ----------------------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------------------


def kl_loss(
    noises: Mapping[str, LogNormalNoise] | Iterable[LogNormalNoise],
    scaling: str = "layer_mean",
    n_train: int | None = None,
) -> torch.Tensor:
    """The KL part of the loss, to be added to the batch-mean data term (cross-entropy / NLL).

    - ``"layer_mean"`` (default, the reference code's ``kl(averaging='mean')`` averaged over layers):
      ``mean_layers(mean_units KL)``.
    - ``"elbo"``: ``sum_units KL / n_train``; with a batch-mean NLL this is ``-ELBO / n_train``, an unbiased
      minibatch estimate of the true (negative) ELBO per example.

    All units are included, pruned or not (as in the reference), so a pruned unit's posterior relaxes towards
    the prior and continuous pruning can bring it back if the data pull it up again.
    """
    mods = list(noises.values()) if isinstance(noises, Mapping) else list(noises)
    if not mods:
        raise ValueError("kl_loss: no noise modules")
    dtype = mods[0].mu.dtype
    if scaling == "layer_mean":
        return torch.stack([m.kl().mean() for m in mods]).mean().to(dtype)
    if scaling == "elbo":
        if not n_train or n_train <= 0:
            raise ValueError("kl_loss(scaling='elbo') needs n_train, the number of training examples")
        return (torch.stack([m.kl().sum() for m in mods]).sum() / n_train).to(dtype)
    raise ValueError(f"scaling must be 'layer_mean' or 'elbo', got {scaling!r}")


# ----------------------------------------------------------------------------------------------------------
# Bayesian model reduction
# ----------------------------------------------------------------------------------------------------------


def _f64(x: torch.Tensor | float) -> torch.Tensor:
    return torch.as_tensor(x).detach().to(torch.float64)


def delta_f_n(
    mu: torch.Tensor | float,
    sigma: torch.Tensor | float,
    log_a: float = -20.0,
    log_b: float = 0.0,
    var_p: float = 1e-12,
    variant: str = "paper",
    mu_p: float | None = None,
) -> torch.Tensor:
    """BMRS_N: ``Delta F`` for a truncated log-normal reduced prior ``log theta ~ N(mu_p, var_p)`` on
    ``[log a, log b]`` (``mu_p = log a`` and ``var_p = 1e-12`` by default: an approximate spike at ``theta = a``).

    BMRS paper, Sec. 4.1 (eq. for ``Delta F`` with ``p~`` truncated log-normal)::

        Delta F = log[Z~_q (log b - log a) / (Z~_p Z_q)] + 1/2 log[var~_q / (2 pi var_p var_q)]
                  - 1/2 (mu_q^2/var_q + mu_p^2/var_p - mu~_q^2/var~_q)

    with ``var~_q = (1/var_q + 1/var_p)^-1``, ``mu~_q = var~_q (mu_q/var_q + mu_p/var_p)`` and the ``Z``'s the
    truncation normalisers on ``[log a, log b]``. Evaluated cancellation-free: the last bracket equals
    ``(mu_q - mu_p)^2 / (var_q + var_p)``, ``var~_q / (var_p var_q) = 1 / (var_q + var_p)``, and the bounds of
    ``q~`` are standardised as ``(var_p (x - mu_q) + var_q (x - mu_p)) / ((var_q + var_p) sd~_q)``. Float64.

    ``variant="paper"`` (this function's default) is that equation, exact (it matches quadrature of the
    free-energy integral). ``variant="code"`` is what the authors' released code computes: it omits the ``2 pi``
    inside the second log, so its ``Delta F`` is larger by exactly ``1/2 log(2 pi) = 0.919``. The difference
    decides whether anything is pruned: as a unit's posterior collapses onto ``theta = a``, the exact
    ``Delta F`` approaches 0 from below and never crosses it, while the code's approaches ``+0.919`` and
    crosses 0 on the way. The published compression comes from the code's formula; the pipeline's default
    (:class:`BMRSPruner`, ``method.delta_f_n``) is therefore ``"code"``. Prune iff ``Delta F >= 0``.
    """
    if variant not in DELTA_F_N_VARIANTS:
        raise ValueError(f"delta_f_n variant must be one of {DELTA_F_N_VARIANTS}, got {variant!r}")
    mu_q, sd_q = _f64(mu), _f64(sigma)
    var_q = sd_q**2
    mu_p = log_a if mu_p is None else float(mu_p)
    s = var_q + var_p
    sd_qt = torch.sqrt(var_q * var_p / s)
    alpha_qt = (var_p * (log_a - mu_q) + var_q * (log_a - mu_p)) / (s * sd_qt)
    beta_qt = (var_p * (log_b - mu_q) + var_q * (log_b - mu_p)) / (s * sd_qt)
    log_z_qt = ln.log_ndtr_diff(alpha_qt, beta_qt)
    log_z_q = ln.log_normaliser(mu_q, sd_q, log_a, log_b)
    sd_p = math.sqrt(var_p)
    log_z_p = ln.log_ndtr_diff(_f64((log_a - mu_p) / sd_p), _f64((log_b - mu_p) / sd_p))
    df = (
        log_z_qt
        + math.log(log_b - log_a)
        - log_z_p
        - log_z_q
        - 0.5 * torch.log(2 * math.pi * s)
        - 0.5 * (mu_q - mu_p) ** 2 / s
    )
    return df + ln.LOG_SQRT_2PI if variant == "code" else df


def delta_f_u(
    mu: torch.Tensor | float,
    sigma: torch.Tensor | float,
    log_a: float = -20.0,
    log_b: float = 0.0,
    p: float = 8,
    log_a_prime: float = -23 * math.log(2.0),
) -> torch.Tensor:
    """BMRS_U: ``Delta F`` for a reduced log-uniform prior on ``[a', b'] = [2^-23, 2^-p]`` (BMRS paper, Sec. 4.2)::

        exp(Delta F) = [log(b/a) / log(b'/a')] * q(a' <= theta <= b')

    i.e. prune iff the posterior mass in ``[a', b']`` is at least the prior's, ``log(b'/a') / log(b/a)``.
    ``p = 8`` by default (``p = 4`` prunes more aggressively). The mass is a log-space CDF difference. Float64.
    """
    log_b_prime = -float(p) * math.log(2.0)
    mu_q, sd_q = _f64(mu), _f64(sigma)
    return (
        math.log(log_b - log_a)
        - math.log(log_b_prime - log_a_prime)
        + ln.log_mass(mu_q, sd_q, log_a, log_b, log_a_prime, log_b_prime)
    )


def prune_scores(
    noise: LogNormalNoise,
    rule: str = "bmrs_n",
    p: float = 8,
    delta_f_n_variant: str = "code",
    var_p: float = 1e-12,
    snr_threshold: float = 1.0,
    theta_threshold: float = 0.1,
) -> torch.Tensor:
    """Per-unit score, float64, higher = more prunable, the unit pruned iff score >= 0.

    ``bmrs_n``/``bmrs_u``: ``Delta F`` (:func:`delta_f_n`, :func:`delta_f_u`). Baselines (Neklyudov et al.
    2017): ``snr``: ``log(snr_threshold) - log(E[theta]/std[theta])`` (prune iff SNR <= 1);
    ``expected_theta``: ``log(theta_threshold) - log E[theta]`` (prune iff E[theta] <= 0.1).
    """
    with torch.no_grad():
        mu, sigma = noise.posterior64()
        if rule == "bmrs_n":
            return delta_f_n(mu, sigma, noise.log_a, noise.log_b, var_p=var_p, variant=delta_f_n_variant)
        if rule == "bmrs_u":
            return delta_f_u(mu, sigma, noise.log_a, noise.log_b, p=p)
        if rule == "snr":
            return math.log(snr_threshold) - torch.log(ln.snr(mu, sigma, noise.log_a, noise.log_b))
        if rule == "expected_theta":
            return math.log(theta_threshold) - torch.log(
                ln.expected_theta(mu, sigma, noise.log_a, noise.log_b)
            )
    raise ValueError(f"rule must be one of {RULES}, got {rule!r}")


def input_weight_norms(model: nn.Module, noises: Mapping[str, LogNormalNoise]) -> dict[str, torch.Tensor]:
    """L2 norm of each unit's incoming weights, float64: the rows of the Linear/Conv that produces the units
    (the noise's ``site.layer``), over all their input dimensions, bias left out -- what the authors'
    ``get_weight_l2`` measures (the last Linear/Conv before each noise layer)."""
    out = {}
    for name, noise in noises.items():
        w = model.get_submodule(noise.site.layer).weight.detach().double()
        if w.shape[0] != noise.units:
            raise NotImplementedError(f"rule={TRAINED_L2!r}: {noise.site.layer!r} has {w.shape[0]} rows for the "
                                      f"{noise.units} units of {name!r}; the L2 rule needs one row per unit")
        out[name] = torch.linalg.vector_norm(w.flatten(1), dim=1)
    return out


def check_amount(amount: float) -> None:
    """The fraction of units the L2 rule prunes must be in (0, 1)."""
    if not 0.0 < float(amount) < 1.0:
        raise ValueError(f"method.amount={amount}: the fraction of units to prune must be in (0, 1)")


def l2_scores(norms: Mapping[str, torch.Tensor], amount: float) -> dict[str, torch.Tensor]:
    """Per-unit score ``t - ||w_u||``, the unit pruned iff score >= 0 (the convention of :func:`prune_scores`),
    with one threshold ``t`` over every layer's units: the ``amount`` quantile of all the norms, linearly
    interpolated. That is the authors' ``np.percentile(all norms, 100 * amount)`` with ``mask = norm > t``: with
    ``n`` distinct norms, ``floor(amount (n - 1)) + 1`` units are pruned, about a fraction ``amount``."""
    check_amount(amount)
    t = torch.quantile(torch.cat([v.reshape(-1) for v in norms.values()]), float(amount))
    return {n: t - v for n, v in norms.items()}


def rank_units(
    noises: Mapping[str, LogNormalNoise], rule: str = "bmrs_n", **score_kwargs
) -> list[tuple[str, int, float]]:
    """All units as ``(noise name, unit index, score)``, most prunable first (score from :func:`prune_scores`,
    ``Delta F`` for the BMRS rules), for post-training pruning sweeps (prune the first k)."""
    rows = [
        (name, i, float(v))
        for name, noise in noises.items()
        for i, v in enumerate(prune_scores(noise, rule, **score_kwargs).tolist())
    ]
    return sorted(rows, key=lambda r: r[2], reverse=True)


# ----------------------------------------------------------------------------------------------------------
# Parameters owned by units
# ----------------------------------------------------------------------------------------------------------


def example_input(model: nn.Module) -> torch.Tensor:
    """A zero batch for tracing ``model``'s dependency groups when the caller gave none: only possible when
    the first conv / linear layer is a Linear (its input size is the flattened input size)."""
    first = next((m for m in model.modules() if isinstance(m, UNIT_TYPES)), None)
    if isinstance(first, nn.Linear):
        ref = next(model.parameters())
        return torch.zeros(2, first.in_features, device=ref.device, dtype=ref.dtype)
    raise ValueError(f"{type(model).__name__}: pass an example input (its shape cannot be inferred)")


def _noise_free_groups(model: nn.Module, example: torch.Tensor | None):
    """Dependency groups of ``model`` traced without its noise (a copy with the noise removed: parameter names
    are unchanged, the noise parameters are not units of any layer)."""
    import copy

    clean = copy.deepcopy(model)
    remove_noise(clean)
    return build_groups(clean, example if example is not None else example_input(clean))


def param_masks(
    model: nn.Module,
    noises: Mapping[str, LogNormalNoise],
    unit_masks: Mapping[str, torch.Tensor] | None = None,
    example: torch.Tensor | None = None,
    groups=None,
) -> dict[str, torch.Tensor]:
    """Parameter-level masks (prunelab convention: ``{param name: bool tensor}``, True = kept) equivalent to
    the unit masks (default: each noise's ``mask`` buffer): for every pruned unit, its two noise parameters and
    what it owns in the network (:func:`~prunelab.pruning.units.sites.site_param_masks`: its layer's row and
    bias, the BatchNorm's affine entries, and -- unless the unit is coupled to others by a residual addition --
    the next layers' input columns, one per flattened position after a flatten)."""
    groups = groups if groups is not None else _noise_free_groups(model, example)
    keep = {n: (unit_masks[n] if unit_masks is not None else noises[n].mask).bool() for n in noises}
    masks = site_param_masks(model, [noises[n].site for n in noises], {noises[n].site.layer: keep[n] for n in noises},
                             example, groups)
    for name in noises:
        for pname in ("mu", "log_sigma"):
            masks[f"{name}.{pname}"] = keep[name].clone()
    return masks


def is_plain_chain(noises: Mapping[str, LogNormalNoise]) -> bool:
    """Every noise follows its producer's activation (the ``activation`` placement of MLPs and LeNets), where
    :func:`authors_cut_weights` pairs noises with weights as the authors' code does. Judged by the placement, not
    by tracing: a branching network with noise after its activations (SqueezeNet, say) passes, and gets the
    authors' module-order rule, which their code never applied to such a network."""
    return all(n.site is not None and n.attached_to == n.site.activation for n in noises.values())


def authors_cut_weights(model: nn.Module, noises: Mapping[str, LogNormalNoise]) -> dict[nn.Module, torch.Tensor]:
    """``{Linear/Conv: bool tensor shaped like its weight}``, True where the BMRS authors' code removes a weight
    for the noises' masks (``get_num_removed_params`` in ``modules/layers.py``): the pruned units' rows of the
    producer (the Linear/Conv before the noise), and their columns of the *next* Linear/Conv in module order,
    only when its input dimension equals the number of units -- so none across a flatten (LeNet-5's
    conv2 -> fc1). Biases never. One rule for both uses of it, as in their code, where the count is of the weights
    this zeroes: :func:`authors_params_removed` and :func:`zero_cut_weights`. Plain chains only
    (:func:`is_plain_chain`): on a ResNet the next layer in module order is not what reads a residual channel."""
    if not is_plain_chain(noises):
        raise NotImplementedError("the BMRS authors' pairing of noise and weights is defined for noise after each "
                                  "activation (MLPs, LeNets), not for this placement")
    layers = [m for m in model.modules() if isinstance(m, UNIT_TYPES)]
    cut_at = {m: torch.zeros(m.weight.shape, dtype=torch.bool, device=m.weight.device) for m in layers}
    for noise in noises.values():
        producer = model.get_submodule(noise.site.layer)
        cut = ~noise.mask.bool().to(producer.weight.device)
        cut_at[producer][cut] = True
        after = layers.index(producer) + 1
        if after < len(layers) and layers[after].weight.shape[1] == noise.units:
            cut_at[layers[after]][:, cut] = True
    return cut_at


def authors_params_removed(model: nn.Module, noises: Mapping[str, LogNormalNoise]) -> tuple[int, int] | None:
    """``(removed, total)`` parameters as the BMRS authors' ``get_true_parameter_compression_percent`` counts
    them, from each noise's ``mask`` (the paper's "Comp %" is presumably this count: its table script reads a
    metric of that name): the weights of :func:`authors_cut_weights` plus two noise parameters per pruned unit;
    ``total`` is every trainable parameter, noise included. ``None`` unless :func:`is_plain_chain`.

    :func:`param_masks` (prunelab's ``frac_params_removed``) counts the bias and the columns after a flatten too,
    so on LeNet-5 it removes more for the same masks."""
    if not is_plain_chain(noises):
        return None
    weights = sum(int(c.sum()) for c in authors_cut_weights(model, noises).values())
    noise_params = 2 * sum(int((~n.mask.bool()).sum()) for n in noises.values())
    return weights + noise_params, sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def zero_cut_weights(model: nn.Module, noises: Mapping[str, LogNormalNoise]) -> None:
    """Zero, in place, the weights of :func:`authors_cut_weights`, as the authors'
    ``get_true_parameter_compression_percent`` does after every epoch (``method.zero_pruned=true``). A unit that
    comes back then restarts from (near) zero incoming weights, and under an incoming-norm rule a cut unit stays
    cut: Adam's stale moments move a zeroed weight a little during the next epoch, in both codes, but not back
    above a threshold."""
    for layer, cut in authors_cut_weights(model, noises).items():
        layer.weight[cut] = 0


def unit_param_counts(
    model: nn.Module, noises: Mapping[str, LogNormalNoise], example: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Parameters owned by each unit, ``{noise name: int64 tensor (units,)}`` (see :func:`param_masks`).

    Units feeding a residual addition (ResNet ``bn2``/``bn3``/downsample) own no consumer weights: pruning
    one of them does not remove the channel from the residual stream. Counts of two units in adjacent layers
    share the weight between them; :func:`param_masks` gives exact totals."""
    groups = _noise_free_groups(model, example)
    out = {}
    for name, noise in noises.items():
        one = torch.ones(noise.units, dtype=torch.bool)
        one[0] = False  # the units of one layer own equal shares: count unit 0's
        masks = param_masks(model, {name: noise}, {name: one}, example, groups)
        per_unit = sum(int((~m).sum()) for m in masks.values())
        out[name] = torch.full((noise.units,), per_unit, dtype=torch.int64)
    return out


# ----------------------------------------------------------------------------------------------------------
# Controller
# ----------------------------------------------------------------------------------------------------------


class BMRSPruner:
    """Threshold-free continuous pruning controller (BMRS paper, Alg. 1): call :meth:`update_masks` after every
    epoch; masks are recomputed from scratch from the current posteriors, so units can come back.

    ``rule``: ``bmrs_n`` (default), ``bmrs_u`` (``p`` = 8, or 4 for more pruning), ``snr`` or
    ``expected_theta`` (baselines), or ``l2_norm``: the authors' L2 baseline, which cuts, at :meth:`freeze`,
    the fraction ``amount`` of the units with the smallest incoming-weight norms over the whole network
    (:func:`l2_scores`; needs ``model``) and, while training, nothing -- or, with ``l2_epoch_threshold``, every
    unit whose norm is at most that (the authors' layer cuts at 0.5 after every epoch when run with their
    default ``--compress_epochs 1``). ``delta_f_n_variant``: ``"code"`` (default, the authors' released code,
    which reproduces the published compression) or ``"paper"`` (Eq. 8, exact; see :func:`delta_f_n`); the
    choice is recorded in :meth:`stats` as ``delta_f_n_variant``.
    """

    def __init__(
        self,
        noises: Mapping[str, LogNormalNoise],
        rule: str = "bmrs_n",
        p: float = 8,
        delta_f_n_variant: str = "code",
        var_p: float = 1e-12,
        snr_threshold: float = 1.0,
        theta_threshold: float = 0.1,
        model: nn.Module | None = None,
        example: torch.Tensor | None = None,
        amount: float | None = None,
        l2_epoch_threshold: float | None = None,
    ) -> None:
        if rule not in METHOD_RULES:
            raise ValueError(f"rule must be one of {METHOD_RULES}, got {rule!r}")
        if rule == TRAINED_L2 and (model is None or amount is None):
            raise ValueError(f"rule={TRAINED_L2!r} needs the model and the fraction of units to prune (amount)")
        if delta_f_n_variant not in DELTA_F_N_VARIANTS:
            raise ValueError(f"delta_f_n_variant must be one of {DELTA_F_N_VARIANTS}, got {delta_f_n_variant!r}")
        if not noises:
            raise ValueError("BMRSPruner: no noise modules")
        self.noises = dict(noises)
        self.rule, self.delta_f_n_variant, self.model = rule, delta_f_n_variant, model
        self.example, self._groups = example, None
        self.score_kwargs = dict(
            p=p,
            delta_f_n_variant=delta_f_n_variant,
            var_p=var_p,
            snr_threshold=snr_threshold,
            theta_threshold=theta_threshold,
        )
        self.amount, self.l2_epoch_threshold = amount, l2_epoch_threshold
        self.frozen = False

    def scores(self, final: bool = False) -> dict[str, torch.Tensor]:
        """Per-unit prune scores (``Delta F`` for BMRS rules), float64. ``l2_norm``: the cut at ``amount``
        (:func:`l2_scores`) when ``final`` or without an ``l2_epoch_threshold``; ``l2_epoch_threshold - norm``
        otherwise (the per-epoch cut)."""
        if self.rule == TRAINED_L2:
            norms = input_weight_norms(self.model, self.noises)
            if final or self.l2_epoch_threshold is None:
                return l2_scores(norms, self.amount)
            return {n: self.l2_epoch_threshold - v for n, v in norms.items()}
        return {n: prune_scores(m, self.rule, **self.score_kwargs) for n, m in self.noises.items()}

    def _apply(self, scores: Mapping[str, torch.Tensor]) -> None:
        for name, score in scores.items():
            self.noises[name].mask.copy_(score.lt(0).to(self.noises[name].mask.device))

    def masks(self) -> dict[str, torch.Tensor]:
        """Current unit masks ``{noise name: bool (units,)}``, True = kept."""
        return {n: m.mask.clone() for n, m in self.noises.items()}

    def update_masks(self) -> dict[str, torch.Tensor]:
        """Set every unit's mask to ``score < 0`` (prune iff ``Delta F >= 0``), from scratch; no-op once frozen.
        ``l2_norm`` cuts here only with an ``l2_epoch_threshold`` (``norm <= threshold``); its cut at ``amount``
        comes at :meth:`freeze`."""
        if not self.frozen and (self.rule != TRAINED_L2 or self.l2_epoch_threshold is not None):
            self._apply(self.scores())
        return self.masks()

    def freeze(self) -> dict[str, torch.Tensor]:
        """Stop updating: the current masks become final (e.g. before fine-tuning). ``l2_norm`` makes its cut at
        ``amount`` here, from the weights at the end of training, from scratch, as the authors' final
        ``compress`` does (under ``zero_pruned`` a unit cut while training has norm 0 and stays cut)."""
        if not self.frozen and self.rule == TRAINED_L2:
            self._apply(self.scores(final=True))
        self.frozen = True
        return self.masks()

    def unfreeze(self) -> None:
        self.frozen = False

    def stats(self, model: nn.Module | None = None) -> dict:
        """Units total/kept/pruned per layer and overall, fraction of units removed, and -- given ``model`` (or
        the constructor's) -- exact fraction of the model's parameters removed (:func:`param_masks`; noise
        parameters included in the total), plus ``rule`` and ``delta_f_n_variant``."""
        layers = {}
        for name, noise in self.noises.items():
            kept = int(noise.mask.sum())
            layers[name] = {"units": noise.units, "kept": kept, "pruned": noise.units - kept}
        total = sum(v["units"] for v in layers.values())
        kept = sum(v["kept"] for v in layers.values())
        out = {
            "rule": self.rule,
            "delta_f_n_variant": self.delta_f_n_variant,
            "frozen": self.frozen,
            "layers": layers,
            "units_total": total,
            "units_kept": kept,
            "units_pruned": total - kept,
            "frac_units_removed": (total - kept) / total,
        }
        model = model if model is not None else self.model
        if model is not None:
            if self._groups is None:  # the network's structure does not change while training: trace once
                self._groups = _noise_free_groups(model, self.example)
            masks = param_masks(model, self.noises, example=self.example, groups=self._groups)
            n_params = sum(p.numel() for p in model.parameters())
            removed = sum(int((~m).sum()) for m in masks.values())
            out.update(params_total=n_params, params_removed=removed, frac_params_removed=removed / n_params)
        return out
