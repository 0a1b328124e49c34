"""BMRS as a pipeline method (``method=bmrs_n``, ``bmrs_u``, ``snr``, ``expected_theta`` with
``schedule=bayesian``): Wright, Igel, Selvan, "BMRS: Bayesian Model Reduction for Structured Pruning",
NeurIPS 2024 (arXiv 2406.01345). The math lives in :mod:`prunelab.pruning.bayes.bmrs`.

Protocol (the paper's continuous pruning, Alg. 1, and the authors' ``train.py``):

1. ``attach``: a :class:`~prunelab.pruning.bayes.bmrs.LogNormalNoise` multiplies every unit's output
   (placement ``auto``: after the non-linearity for MLP/LeNet, after every BatchNorm for ResNets/VGG);
   the model trains from init with loss = batch-mean cross-entropy + KL (``kl_scaling``).
2. After every epoch (:meth:`BMRSHook.on_epoch_end`) every unit's mask is recomputed *from scratch* from the
   current posteriors (prune iff ``Delta F >= 0`` for ``bmrs_n``/``bmrs_u``; ``E[theta]/std < 1`` for
   ``snr``; ``E[theta] < 0.1`` for ``expected_theta``): a unit pruned in one epoch comes back when its
   posterior moves away. ``l2_norm``, the authors' L2 baseline, makes its cut by incoming-weight L2 norm when
   ``finish`` freezes the masks; while training it cuts only with ``l2_epoch_threshold``. With
   ``zero_pruned`` the cut units' weights are then zeroed in place, as the authors' code does.
3. ``finish``: masks frozen; the evaluation-mode noise ``E[theta] * mask`` is folded into the weights
   (:func:`fold_noise`: BatchNorm affine parameters, or the producing Linear/Conv's rows and bias when the
   noise follows a ReLU -- exact, ``relu(c z) = c relu(z)`` for ``c >= 0`` -- or, after any other activation
   such as the authors' Tanh, the input columns of the layers that read the units), the noise is removed and the
   pruned units are removed physically (:func:`compact_folded`, the units' ``compact_units``). A unit
   coupled to others by a residual addition is removed only when every coupled unit is pruned; otherwise it
   stays, exactly zero, in the :class:`~prunelab.pruning.masks.MaskSet` that ``finish`` hands to fine-tuning.
4. The schedule then fine-tunes the plain network (``finetune.keep_best=true``: best validation epoch).

Deviation from the authors' code: their fine-tuning keeps the noise layers (still sampled, KL still in the
loss, masks frozen); here the fine-tuned network is the plain (folded, compacted) one.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunelab.pruning.bayes import bmrs as B
from prunelab.pruning.masks import MaskSet
from prunelab.pruning.method import Finished, TrainingMethod, check_choice, example_batch, train_set_size
from prunelab.pruning.units.compact import compact_units
from prunelab.pruning.units.groups import build_groups, unit_index
from prunelab.pruning.units.layers import BN_TYPES, HOMOGENEOUS_TYPES
from prunelab.training.hooks import TrainHook, masks_checksum

log = logging.getLogger(__name__)

KL_SCALINGS = ("layer_mean", "elbo")


# ----------------------------------------------------------------------------------------------------------
# Folding E[theta] * mask into the weights, physical removal
# ----------------------------------------------------------------------------------------------------------


def noise_sites(model: nn.Module, noises: dict[str, B.LogNormalNoise]) -> dict[str, dict[str, str]]:
    """For every noise, where its evaluation-mode factor ``E[theta] * mask`` is folded, from the noise's layer
    site (:class:`~prunelab.pruning.units.sites.LayerSite`): ``{"fold": module, "producer": the Linear/Conv
    whose output channels are the units, "into": "rows" | "columns"}``.

    - ``rows``: the factor multiplies the output channels of ``fold`` (the BatchNorm's affine parameters, or
      the producing layer's rows and bias). Exact when the noise sits after the norm or the layer, or after a
      positively homogeneous activation (``relu(c z) = c relu(z)`` for ``c >= 0``).
    - ``columns``: after any other activation (Tanh, Sigmoid, GELU, ...) the factor cannot pass back through
      the non-linearity, so it goes forward instead: into the input columns of every layer that reads the
      units (the ``in`` members of the producer's dependency group, after a flatten or a pooling too). Exact
      for any activation, because the noise multiplies the activation's output, and what lies between it and
      the readers (pooling, flatten, dropout) commutes with a positive per-channel factor; :meth:`BMRSMethod.finish`
      checks the folded network against the noisy one on a batch and refuses a fold that is not exact.

    Raises ``NotImplementedError`` for a BatchNorm without affine parameters."""
    out = {}
    for name, noise in noises.items():
        site, target = noise.site, noise.attached_to
        if site is None:
            raise NotImplementedError(f"BMRS: noise {name!r} has no layer site (not inserted by insert_noise)")
        m = model.get_submodule(target)
        if target == site.activation and not isinstance(m, HOMOGENEOUS_TYPES):
            out[name] = {"fold": site.layer, "producer": site.layer, "into": "columns"}
            continue
        fold = site.norm if target != site.layer and site.norm is not None else site.layer
        fm = model.get_submodule(fold)
        if isinstance(fm, BN_TYPES) and (getattr(fm, "weight", None) is None or getattr(fm, "bias", None) is None):
            raise NotImplementedError(f"BMRS: BatchNorm {fold!r} without affine parameters")
        out[name] = {"fold": fold, "producer": site.layer, "into": "rows"}
    return out


@torch.no_grad()
def fold_noise(model: nn.Module, noises: dict[str, B.LogNormalNoise], sites: dict[str, dict[str, str]],
               example: torch.Tensor | None = None) -> None:
    """Multiply ``c = E[theta] * mask`` (the evaluation-mode noise) into the weights, in place, where
    :func:`noise_sites` says: ``rows``: BatchNorm ``weight, bias <- c * weight, c * bias``, Linear/Conv rows
    and bias ``<- c * ...``; ``columns``: every reader's input columns ``W[:, j] <- c_u W[:, j]`` for the
    columns ``j`` that read unit ``u`` (from the dependency groups traced on ``example``; needed only then).
    Call :func:`bmrs.remove_noise` first (the groups are traced on the noise-free network)."""
    groups = None
    if any(v["into"] == "columns" for v in sites.values()):
        if example is None:
            raise ValueError("fold_noise: folding into the readers' columns needs an example input")
        groups = {g.id: g for g in build_groups(model, example)}
    for name, noise in noises.items():
        c = (noise.expected_theta() * noise.mask.double()).to(torch.float64)
        where = sites[name]
        if where["into"] == "columns":
            group = groups.get(where["producer"])
            if group is None or not group.consumers():
                raise NotImplementedError(f"BMRS: no layer reads the units of {where['producer']!r}; "
                                          "cannot fold the noise after its activation")
            for member in group.consumers():
                w = model.get_submodule(member.name).weight
                idxs, roots = unit_index(member)
                factor = c.to(w.device)[roots].view([1, -1] + [1] * (w.ndim - 2))
                w[:, idxs] = (w[:, idxs].double() * factor).to(w.dtype)
            continue
        m = model.get_submodule(where["fold"])
        for pname in ("weight", "bias"):
            p = getattr(m, pname, None)
            if p is None:
                continue
            shape = [1] * p.ndim
            shape[0] = -1
            p.copy_((p.double() * c.to(p.device).view(shape)).to(p.dtype))


def compact_folded(
    model: nn.Module, unit_masks: dict[str, torch.Tensor], noises: dict[str, B.LogNormalNoise], example: torch.Tensor
) -> tuple[nn.Module, MaskSet | None, dict[str, Any]]:
    """Remove the pruned units of the (folded, noise-free) ``model`` physically with
    :func:`~prunelab.pruning.units.compact.compact_units`: a unit coupled to others by a residual addition is
    removed only when every coupled layer prunes it; the others stay, exactly zero, in the returned
    :class:`MaskSet` that fine-tuning enforces. ``unit_masks``: ``{noise name: bool (units,)}``."""
    keep = {noises[n].site.layer: m.bool() for n, m in unit_masks.items()}
    return compact_units(model, keep, [noises[n].site for n in unit_masks], example)


# ----------------------------------------------------------------------------------------------------------
# Hook and method
# ----------------------------------------------------------------------------------------------------------


class BMRSHook(TrainHook):
    """Loss = cross-entropy + KL; noise parameters without weight decay; masks recomputed every epoch."""

    def __init__(self, pruner: B.BMRSPruner, kl_scaling: str = "layer_mean", n_train: int | None = None,
                 noise_lr: float | None = None, zero_pruned: bool = False):
        self.pruner, self.noise_lr, self.zero_pruned = pruner, noise_lr, zero_pruned
        self.kl_scaling, self.n_train = kl_scaling, n_train
        self.history: list[dict[str, Any]] = []

    @property
    def noises(self) -> dict[str, B.LogNormalNoise]:
        return self.pruner.noises

    def loss(self, module, x, y):
        logits = module.model(x)
        kl = B.kl_loss(self.noises, self.kl_scaling, self.n_train)
        return F.cross_entropy(logits, y) + kl, logits

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        noise_ids = {id(p) for n in B.find_noise(model).values() for p in (n.mu, n.log_sigma)}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in noise_ids]
        noise = [p for p in model.parameters() if p.requires_grad and id(p) in noise_ids]
        group = {"params": noise, "weight_decay": 0.0}
        if self.noise_lr is not None:
            group["lr"] = self.noise_lr
        return [{"params": rest}, group]

    def on_epoch_end(self, module) -> dict[str, float]:
        self.pruner.update_masks()
        if self.zero_pruned:  # the authors' code zeroes the cut units' rows and columns after every epoch
            B.zero_cut_weights(module.model, self.noises)
        s = self.pruner.stats(module.model)
        entry = {"epoch": int(module.current_epoch), "units_kept": s["units_kept"],
                 "frac_units_removed": s["frac_units_removed"], "frac_params_removed": s["frac_params_removed"],
                 "ranks_agree": module.check_ranks_agree(masks_checksum(self.pruner.masks().values()),
                                                        "BMRS masks (noise parameters)")}
        self.history.append(entry)
        return {"bmrs/units_kept": float(s["units_kept"]), "bmrs/frac_units_removed": s["frac_units_removed"],
                "bmrs/frac_params_removed": s["frac_params_removed"]}

    def state_dict(self) -> dict[str, Any]:
        return {"masks": {n: m.cpu() for n, m in self.pruner.masks().items()}, "history": list(self.history),
                "frozen": self.pruner.frozen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, mask in state["masks"].items():
            self.noises[name].mask.copy_(mask.to(self.noises[name].mask.device))
        self.history = list(state["history"])
        self.pruner.frozen = bool(state["frozen"])


class BMRSMethod(TrainingMethod):
    """Threshold-free structured pruning with multiplicative log-normal noise and Bayesian model reduction.

    ``rule``: ``bmrs_n`` (default), ``bmrs_u`` (reduced log-uniform prior on ``[2^-23, 2^-p]``, ``p`` = 8; 4
    prunes more), ``snr`` (``E[theta]/std[theta] < 1``), ``expected_theta`` (``E[theta] < 0.1``), or
    ``l2_norm`` (``method=bmrs_l2``): the authors' L2 baseline, trained with the same noise and KL, nothing
    pruned while training, then the fraction ``amount`` of the units with the smallest incoming-weight L2
    norms over the whole network (:func:`~prunelab.pruning.bayes.bmrs.l2_scores`); ``amount`` is for that rule
    only, and ``scripts/reproduce_bmrs_fmnist.sh`` sets it to BMRS_N's unit fraction of the same seed.
    ``l2_epoch_threshold`` (``l2_norm`` only): also cut, after every epoch and from scratch, every unit whose
    incoming norm is at most this (the authors' layer: 0.5, when run with their default ``--compress_epochs 1``).
    ``zero_pruned``: after every epoch, zero the cut units' producer rows and reader columns in place, as the
    authors' code does (:func:`~prunelab.pruning.bayes.bmrs.zero_cut_weights`; MLPs and LeNets). The default,
    ``false``, keeps the weights, so a unit that comes back resumes where it was.
    ``delta_f_n``: ``code`` (default: ``Delta F_N`` as the authors' released code computes it, which reproduces
    the published compression) or ``paper`` (Eq. 8 as printed, the exact free-energy change, which prunes
    next to nothing; see :func:`~prunelab.pruning.bayes.bmrs.delta_f_n`). ``kl_scaling``: ``layer_mean`` (reference code: KL averaged within each layer, then across
    layers) or ``elbo`` (sum of KLs / number of training examples). ``log_a``, ``log_b``: bounds of
    ``log theta``; ``mu_init``, ``log_sigma_init``: posterior initialisation; ``placement``: see
    :func:`~prunelab.pruning.bayes.bmrs.insert_noise`; ``sample_mode``: see
    :class:`~prunelab.pruning.bayes.bmrs.LogNormalNoise`; ``noise_lr``: learning rate of the noise parameters
    (``null``: the stage's learning rate, as in the paper; reduced-scale runs with few steps raise it).
    """

    structured = True
    needs_data = True
    supports_one_shot = False
    prune_target, target_option = "none", None  # threshold-free: Delta F >= 0 decides

    def __init__(self, rule: str = "bmrs_n", p: float = 8, delta_f_n: str = "code",
                 kl_scaling: str = "layer_mean", log_a: float = -20.0, log_b: float = 0.0, mu_init: float = 0.0,
                 log_sigma_init: float = -5.0, placement: str = "auto", sample_mode: str = "element",
                 noise_lr: float | None = None, amount: float | None = None,
                 l2_epoch_threshold: float | None = None, zero_pruned: bool = False):
        check_choice("method.rule", rule, B.METHOD_RULES)
        if (rule == B.TRAINED_L2) != (amount is not None):
            raise ValueError(f"method.amount={amount} with method.rule={rule}: the fraction of units to prune is set "
                             f"for rule={B.TRAINED_L2} (method=bmrs_l2) and only for it")
        if amount is not None:
            B.check_amount(amount)
        self.amount = None if amount is None else float(amount)
        if l2_epoch_threshold is not None and (rule != B.TRAINED_L2 or not float(l2_epoch_threshold) > 0):
            raise ValueError(f"method.l2_epoch_threshold={l2_epoch_threshold} with method.rule={rule}: a norm > 0, "
                             f"for rule={B.TRAINED_L2} (method=bmrs_l2) only")
        self.l2_epoch_threshold = None if l2_epoch_threshold is None else float(l2_epoch_threshold)
        if not isinstance(zero_pruned, bool):
            raise ValueError(f"method.zero_pruned={zero_pruned!r}: allowed values: true, false")
        self.zero_pruned = zero_pruned
        check_choice("method.kl_scaling", kl_scaling, KL_SCALINGS)
        check_choice("method.placement", placement, B.PLACEMENTS)
        check_choice("method.sample_mode", sample_mode, B.SAMPLE_MODES)
        check_choice("method.delta_f_n", delta_f_n, B.DELTA_F_N_VARIANTS)
        p = float(p)
        if not 0 < p < 23:
            raise ValueError(f"method.p={p}: the reduced support [2^-23, 2^-p] needs 0 < p < 23")
        if not float(log_a) < float(log_b) <= 0.0:
            raise ValueError(f"method.log_a={log_a}, method.log_b={log_b}: need log_a < log_b <= 0")
        if rule == "bmrs_u" and not float(log_a) <= -23 * math.log(2.0):
            raise ValueError(f"method.log_a={log_a}: bmrs_u needs log_a <= log(2^-23) = {-23 * math.log(2):.3f}")
        self.rule, self.name = rule, rule
        self.p, self.delta_f_n_variant, self.kl_scaling = p, delta_f_n, kl_scaling
        self.log_a, self.log_b = float(log_a), float(log_b)
        self.mu_init, self.log_sigma_init = float(mu_init), float(log_sigma_init)
        self.placement, self.sample_mode = placement, sample_mode
        if noise_lr is not None and not float(noise_lr) > 0:
            raise ValueError(f"method.noise_lr={noise_lr}: must be null or > 0")
        self.noise_lr = None if noise_lr is None else float(noise_lr)

    def target(self) -> tuple[float | None, str]:
        return None, self.rule

    def attach(self, ctx, model: nn.Module, schedule: Any) -> tuple[nn.Module, BMRSHook]:
        example = example_batch(ctx, model)
        noises = B.insert_noise(model, self.placement, example=example, log_a=self.log_a, log_b=self.log_b,
                                init_mu=self.mu_init, init_log_sigma=self.log_sigma_init, sample_mode=self.sample_mode)
        pruner = B.BMRSPruner(noises, rule=self.rule, p=self.p, delta_f_n_variant=self.delta_f_n_variant, model=model,
                              example=example, amount=self.amount, l2_epoch_threshold=self.l2_epoch_threshold)
        if self.zero_pruned and not B.is_plain_chain(noises):
            raise NotImplementedError(f"method.zero_pruned=true: the authors' in-place zeroing is defined for noise "
                                      f"after each activation (MLPs, LeNets); placement={self.placement} here")
        n_train = train_set_size(ctx.datamodule) if self.kl_scaling == "elbo" else None
        return model, BMRSHook(pruner, self.kl_scaling, n_train, self.noise_lr, self.zero_pruned)

    def finish(self, ctx, model: nn.Module, hook: BMRSHook) -> Finished:
        pruner = hook.pruner
        masks = pruner.freeze()
        stats = pruner.stats(model)
        authors = B.authors_params_removed(model, pruner.noises)  # None off plain chains
        model.eval()
        device = next(model.parameters()).device
        example = torch.randn(4, *ctx.input_shape, device=device)
        with torch.no_grad():
            masked_out = model(example)
        noises = dict(pruner.noises)
        B.remove_noise(model)
        sites = noise_sites(model, noises)
        fold_noise(model, noises, sites, example)
        with torch.no_grad():
            fold_diff = float((model(example) - masked_out).abs().max())
        if fold_diff > 1e-4 * max(1.0, float(masked_out.abs().max())):
            raise RuntimeError(
                f"BMRS: the folded network differs from the noisy one by {fold_diff:.3g} on a batch; an operation "
                "between a noise and the layers it was folded into does not commute with a per-unit factor "
                f"(folds: { {n: v['into'] for n, v in sites.items()} }); use method.placement=batchnorm")
        small, left, cinfo = compact_folded(model, masks, noises, example)
        small.eval()
        with torch.no_grad():
            compact_diff = float((small(example) - masked_out).abs().max())
        small.train()  # the fine-tuning stage trains it (Lightning does not switch modules back to train mode)
        scale = float(masked_out.abs().max()) + 1e-12
        if compact_diff > 1e-4 * max(1.0, scale):
            log.warning("BMRS: compacted model differs from the masked one by %.3g (max |logit| %.3g)",
                        compact_diff, scale)
        layers = stats["layers"]
        record = {
            "rule": self.rule, "delta_f_n_variant": self.delta_f_n_variant, "p": self.p,
            "kl_scaling": self.kl_scaling, "placement": self.placement, "noise_lr": self.noise_lr,
            "amount": self.amount, "l2_epoch_threshold": self.l2_epoch_threshold, "zero_pruned": self.zero_pruned,
            "units_total": stats["units_total"], "units_removed": stats["units_pruned"],
            "frac_units_removed": stats["frac_units_removed"],
            "params_total_with_noise": stats["params_total"], "params_removed": stats["params_removed"],
            "frac_params_removed": stats["frac_params_removed"],
            "layers": {n: dict(v, fold=sites[n]["fold"], fold_into=sites[n]["into"]) for n, v in layers.items()},
            "history": hook.history, "fold_max_abs_diff": fold_diff, "compact_max_abs_diff": compact_diff,
            "units_removed_physically": cinfo["units_removed_physically"],
            "units_masked_not_removed": cinfo["units_masked_not_removed"],
            "metrics": {"bmrs/units_total": stats["units_total"], "bmrs/units_removed": stats["units_pruned"],
                        "bmrs/frac_units_removed": stats["frac_units_removed"],
                        "bmrs/frac_params_removed": stats["frac_params_removed"],
                        "bmrs/units_removed_physically": cinfo["units_removed_physically"],
                        "bmrs/compact_max_abs_diff": compact_diff},
            "final": {"rule": self.rule, "delta_f_n_variant": self.delta_f_n_variant,
                      "frac_units_removed": stats["frac_units_removed"],
                      "frac_params_removed": stats["frac_params_removed"],
                      "frac_params_removed_authors": None if authors is None else authors[0] / authors[1],
                      "units_total": stats["units_total"], "units_removed": stats["units_pruned"]},
        }
        log.info("BMRS %s (%s): %d / %d units removed (%.1f%%), %.1f%% of the parameters", self.rule,
                 self.delta_f_n_variant, stats["units_pruned"], stats["units_total"],
                 100 * stats["frac_units_removed"], 100 * stats["frac_params_removed"])
        return Finished(small, left, record)
