"""DLLP in the pipeline: ``method=dllp schedule=train_prune`` (Stein variational gate particles, reliability).

prunelab's implementation of the *abstract* of Wang et al., "Efficient Stein Variational Inference for
Reliable Distribution-lossless Network Pruning" (arXiv 2212.03537); the model, the SVGD update and the
decision rule are prunelab's design (:mod:`prunelab.pruning.bayes.dllp`), not the paper's unpublished details.

Pruning stage (``schedule.epochs`` epochs from the pretrained dense network, ``schedule.pretrained: true``):

* :meth:`DLLPMethod.attach` wraps the network with ``M = particles`` particles of gate logits
  (:func:`~prunelab.pruning.bayes.dllp.attach_gates`): prior keep-probabilities from the vanilla network's
  importance (``prior.importance``: ``taylor`` (default) or ``ablation``, function-based, measured through the
  gates on ``prior.batches`` fixed training batches (``datamodule.score_batches``: the same on every rank) and
  invariant to function-preserving rescaling of a unit; or the magnitude-based ``l2`` incoming-weight norm /
  ``bn`` ``|gamma|``, which are not), shifted so that the prior's expected kept fraction is ``1 - sparsity``
  (``method.sparsity``, by default ``prune.sparsity``).
* ``train_weights: false`` (default): ``W`` is frozen for the stage (``requires_grad`` off, restored in
  :meth:`DLLPMethod.finish`; BatchNorm in eval mode), the posterior is over units of the given network (see
  :mod:`~prunelab.pruning.bayes.dllp`). ``budget_lr > 0`` (default 0.5): the target is tilted by
  ``-lam N kept_fraction`` with ``lam`` found by dual ascent so that each particle keeps about ``1 - sparsity``
  of the units (``lam`` travels in the hook's checkpoint state).
* Every training step (:class:`DLLPHook`) runs ONE batched forward of all particles (logits ``(M, B, C)``):

  - ``hook.loss``: the loss for the shared weights ``W`` (trained only with ``train_weights: true``) is the
    cross-entropy averaged over particles; from the
    same graph (``torch.autograd.grad``, graph retained) it takes ``dS/dz`` with
    ``S = sum_m sum_b log p(y_b | x_b, z_m, W)``;
  - ``after_backward``: under DDP ``dS/dz`` is averaged across ranks (``module.all_reduce_mean``: each rank's
    ``(N / B) dS/dz`` is an unbiased estimate of the full-data gradient, so their mean is one too, and every
    rank then computes the SAME SVGD direction: particles stay identical across ranks), then
    ``grad log p(z | D) = data_weight (N / B) dS/dz + grad log p(z)`` (``N`` = size of the training split,
    ``B`` = per-rank batch) and the SVGD direction ``phi`` (per-layer RBF kernels). ``z.grad = -phi``
    overwrites what the pipeline's backward of the CE put there;
  - the pipeline's optimiser steps ``W`` only (:meth:`DLLPHook.param_groups` leaves the particle logits out);
    ``after_step`` steps the hook's own Adam on the particles (``svgd.lr``) and anneals the gate temperature
    ``tau`` with training progress ``trainer.global_step / module.total_steps()``.

  Validation/test during the stage use the particle ensemble with hard gates ``1[z > 0]``: the log of the
  particle-averaged predictive probabilities (:meth:`DLLPHook.eval_logits`).

* :meth:`DLLPMethod.finish`: inclusion probabilities ``rho_u`` -> unit masks (``decision: threshold``:
  ``rho >= 0.5``; ``target``: the top units by ``rho`` meeting the sparsity), the reliability report on
  held-out data (``reliability_split``, at most ``reliability_batches`` batches), and ONE pruned network: gates
  removed, pruned units zeroed, then physically removed with the structured compaction
  (:func:`~prunelab.pruning.units.compact.compact_units`, Torch-Pruning's dependency groups). A unit of a
  dependency group is removed only when every producer of that channel (e.g. all the residual-coupled convs
  writing one residual stream) is a DLLP site that pruned it; the other pruned units stay in the network as
  exact zeros, in the :class:`~prunelab.pruning.masks.MaskSet` that ``finish`` hands to fine-tuning (so the
  fine-tuned network is the decided one). The compacted network is checked against the masked one on a
  random batch (eval mode). Per-weight gates (``granularity: weight``) cannot be compacted: the masked dense
  network is returned with its weight masks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from prunelab.pruning.bayes.dllp import DLLP, IMPORTANCES, PRIOR_CLIP, DLLPModel, attach_gates
from prunelab.pruning.bayes.dllp_prior import FUNCTION_IMPORTANCES
from prunelab.pruning.bayes.svgd import svgd_direction_blocks
from prunelab.pruning.effective import effective_sparsity_report
from prunelab.pruning.masks import MaskSet
from prunelab.pruning.method import Finished, TrainingMethod, check_choice, example_batch, train_set_size
from prunelab.pruning.units.compact import compact_units
from prunelab.training.hooks import TrainHook

log = logging.getLogger(__name__)

GATES = {"soft": "soft", "hard": "ste"}  # config name -> dllp gate mode (hard = straight-through)
INITS = ("prior", "normal")
TAU_SCHEDULES = ("geometric", "linear")
GRANULARITIES = ("unit", "weight")
DECISIONS = ("threshold", "target")
SPLITS = ("test", "val")
THRESHOLD = 0.5
COMPACT_TOL = 1e-5        # relative (to the largest |logit|) tolerance of compacted vs masked outputs
RHO_LIST_LIMIT = 50_000   # per-unit rho lists go into the record up to this many gated units


def _options(name: str, node: Any, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """A nested option block (``tau``, ``prior``, ``svgd``) merged over its defaults; unknown keys fail."""
    if node is None:
        return dict(defaults)
    if not isinstance(node, Mapping):
        try:
            from omegaconf import OmegaConf

            node = OmegaConf.to_container(node, resolve=True)
        except Exception:  # noqa: BLE001
            raise ValueError(f"method.{name} must be a mapping with keys {', '.join(defaults)}") from None
    unknown = [k for k in node if k not in defaults]
    if unknown:
        raise ValueError(f"method.{name}.{unknown[0]} is not an option; allowed options: {', '.join(defaults)}")
    return {**defaults, **dict(node)}


class DLLPHook(TrainHook):
    """One SVGD step on the particles and one optimiser step on ``W`` per training step (module docstring)."""

    def __init__(self, dllp: DLLP, lr: float, n_train: int, train_weights: bool = False):
        self.dllp = dllp
        self.train_weights = bool(train_weights)
        self.n_train = int(n_train)
        self.z_opt = dllp.particle_optimizer(lr)
        self._grad_ll: list[Tensor] | None = None
        self._batch = 0
        self._phi_sq = 0.0
        self._steps_in_epoch = 0
        self.history: list[dict[str, float]] = []

    @property
    def model(self) -> DLLPModel:
        return self.dllp.model

    # training step ---------------------------------------------------------------------------------------
    def loss(self, module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = module.model(x)                                   # (M, B, C), one batched pass
        loss = self.dllp.loss_weights(logits, y)
        zs = self.dllp.particle_parameters()
        s = self.dllp.log_likelihood(logits, y).sum()
        grads = torch.autograd.grad(s, zs, retain_graph=True, allow_unused=True)
        self._grad_ll = [torch.zeros_like(z) if g is None else g.detach() for z, g in zip(zs, grads)]
        self._batch = int(y.shape[0])
        return loss, logits.detach().mean(0)

    def svgd_gradients(self, module) -> list[Tensor]:
        """``grad_z log p(z | D)`` per block from the stored ``dS/dz`` (rank-averaged) and the prior."""
        zs = self.dllp.particle_parameters()
        if self._grad_ll is None:
            raise RuntimeError("DLLPHook.after_backward before loss")
        flat = torch.cat([g.flatten() for g in self._grad_ll])
        flat = module.all_reduce_mean(flat) if module is not None else flat
        gl = list(torch.split(flat, [z.numel() for z in zs]))
        with torch.enable_grad():
            zd = [z.detach().requires_grad_(True) for z in zs]
            gp = torch.autograd.grad(self.dllp.log_prior_target(zd).sum(), zd)
        scale = self.dllp.data_weight * self.n_train / max(1, self._batch)
        return [scale * g.view_as(z) + p for g, z, p in zip(gl, zs, gp)]

    def after_backward(self, module, batch_idx: int) -> None:
        zs = self.dllp.particle_parameters()
        phis = svgd_direction_blocks([z.detach() for z in zs], self.svgd_gradients(module))
        for z, phi in zip(zs, phis):
            z.grad = -phi                     # overwrites d CE / dz from the pipeline's backward
        self._phi_sq += float(sum(p.pow(2).sum() for p in phis))
        self._steps_in_epoch += 1
        self._grad_ll = None

    def after_step(self, module, batch_idx: int) -> None:
        self.z_opt.step()
        self.dllp.update_dual()
        self._set_tau(module)

    def _set_tau(self, module) -> None:
        trainer = getattr(module, "trainer", None)
        if trainer is None:
            return
        total = max(1, module.total_steps())
        self.dllp.set_progress(int(trainer.global_step) / total)

    def on_train_start(self, module) -> None:
        self._set_tau(module)   # resumed runs continue the schedule where they stopped

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """``W`` only (the particles have their own Adam). With ``train_weights=false`` the weights are frozen
        (``requires_grad`` off, :meth:`DLLPMethod.attach`): they are handed over with ``lr = 0`` and no weight
        decay, and as they get no gradient no optimiser (nor a scheduler's lr) moves them."""
        particle_ids = {id(p) for p in self.dllp.particle_parameters()}
        if not self.train_weights:
            ws = [p for p in self.dllp.model.model.parameters() if id(p) not in particle_ids]
            return [{"params": ws, "lr": 0.0, "weight_decay": 0.0}]
        return [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in particle_ids]}]

    # evaluation ------------------------------------------------------------------------------------------
    def eval_logits(self, model: nn.Module, x: Tensor) -> Tensor:
        """``log (1/M) sum_m softmax(f(x; z_m))`` with hard gates ``1[z > 0]``, shape ``(B, C)``."""
        logits = model.forward_gates(x, model.particle_gates("hard"))
        return torch.logsumexp(logits.float().log_softmax(-1), 0) - math.log(logits.shape[0])

    def on_epoch_end(self, module) -> dict[str, float]:
        rho = torch.cat([r.flatten() for r in self.dllp.inclusion_probs().values()])
        out = {"dllp/tau": float(self.dllp.tau), "dllp/rho_mean": float(rho.mean()),
               "dllp/lam": float(self.dllp.lam), "dllp/density": float(self.dllp.hard_density().mean()),
               "dllp/rho_prior_abs_diff": float(self.dllp.posterior_shift()["mean_abs_diff"]),
               "dllp/undecided_fraction": float(((rho > 0.2) & (rho < 0.8)).double().mean()),
               "dllp/phi_rms": math.sqrt(self._phi_sq / max(1, self._steps_in_epoch))}
        entry = {k.split("/", 1)[1]: v for k, v in out.items()}
        # particles must be identical on every rank (the SVGD data term is rank-averaged)
        sig = sum(z.detach().double().sum() + z.detach().double().pow(2).sum() for z in self.dllp.particle_parameters())
        entry["ranks_agree"] = module.check_ranks_agree(sig, "DLLP particles")
        self.history.append(entry)
        self._phi_sq, self._steps_in_epoch = 0.0, 0
        return out

    # checkpoint ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # the particles themselves are parameters of the trained module (in the Lightning state dict)
        return {"z_opt": self.z_opt.state_dict(), "history": list(self.history), "tau": float(self.dllp.tau),
                "lam": float(self.dllp.lam)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.z_opt.load_state_dict(state["z_opt"])
        self.history = list(state.get("history", []))
        if "tau" in state:
            self.dllp.model.tau = float(state["tau"])
        self.dllp.lam = float(state.get("lam", 0.0))


class DLLPMethod(TrainingMethod):
    """``method=dllp`` (see the module docstring and ``conf/method/dllp.yaml``)."""

    name = "dllp"
    needs_data = True
    prune_target, target_option = "units", "method.sparsity"

    def __init__(
        self,
        particles: int = 10,
        tau: Mapping[str, Any] | None = None,
        gate: str = "soft",
        prior: Mapping[str, Any] | None = None,
        svgd: Mapping[str, Any] | None = None,
        granularity: str = "unit",
        sparsity: float | None = None,
        decision: str = "threshold",
        reliability_batches: int = 10,
        reliability_split: str = "test",
        data_weight: float = 1.0,
        train_weights: bool = False,
        budget_lr: float = 0.5,
        exclude: list[str] | tuple[str, ...] = (),
        seed: int = 0,
    ):
        if isinstance(particles, bool) or int(particles) != particles or int(particles) < 1:
            raise ValueError(f"method.particles={particles} must be an integer >= 1")
        self.particles = int(particles)
        t = _options("tau", tau, {"start": 1.0, "end": 0.1, "schedule": "geometric"})
        if not (float(t["start"]) > 0 and float(t["end"]) > 0):
            raise ValueError(f"method.tau.start={t['start']} and method.tau.end={t['end']} must be > 0")
        check_choice("method.tau.schedule", t["schedule"], TAU_SCHEDULES)
        self.tau = {"start": float(t["start"]), "end": float(t["end"]), "schedule": str(t["schedule"])}
        self.gate = check_choice("method.gate", gate, tuple(GATES))
        p = _options("prior", prior, {"importance": "taylor", "temperature": 1.0, "clip": list(PRIOR_CLIP),
                                      "init": "prior", "batches": 4})
        check_choice("method.prior.importance", p["importance"], IMPORTANCES)
        check_choice("method.prior.init", p["init"], INITS)
        clip = [float(c) for c in p["clip"]]
        if len(clip) != 2 or not 0.0 < clip[0] < clip[1] < 1.0:
            raise ValueError(f"method.prior.clip={clip} must be [lo, hi] with 0 < lo < hi < 1")
        if float(p["temperature"]) <= 0:
            raise ValueError(f"method.prior.temperature={p['temperature']} must be > 0")
        if isinstance(p["batches"], bool) or int(p["batches"]) != p["batches"] or int(p["batches"]) < 1:
            raise ValueError(f"method.prior.batches={p['batches']} must be an integer >= 1")
        self.prior = {"importance": p["importance"], "temperature": float(p["temperature"]), "clip": clip,
                      "init": p["init"], "batches": int(p["batches"])}
        s = _options("svgd", svgd, {"lr": 0.1})
        if float(s["lr"]) <= 0:
            raise ValueError(f"method.svgd.lr={s['lr']} must be > 0")
        self.svgd = {"lr": float(s["lr"])}
        self.granularity = check_choice("method.granularity", granularity, GRANULARITIES)
        if self.granularity == "weight" and self.prior["importance"] in ("bn", "ablation"):
            raise ValueError(f"method.prior.importance={self.prior['importance']!r} needs method.granularity='unit'"
                             "; allowed values with granularity=weight: taylor, l2")
        self.decision = check_choice("method.decision", decision, DECISIONS)
        self.sparsity = None if sparsity is None else self._check_sparsity(float(sparsity))
        if int(reliability_batches) < 1:
            raise ValueError(f"method.reliability_batches={reliability_batches} must be >= 1")
        self.reliability_batches = int(reliability_batches)
        self.reliability_split = check_choice("method.reliability_split", reliability_split, SPLITS)
        if float(data_weight) < 0:
            raise ValueError(f"method.data_weight={data_weight} must be >= 0")
        self.data_weight = float(data_weight)
        if not isinstance(train_weights, bool):
            raise ValueError(f"method.train_weights={train_weights!r} must be true or false")
        self.train_weights = train_weights
        if float(budget_lr) < 0:
            raise ValueError(f"method.budget_lr={budget_lr} must be >= 0 (0: no unit-budget tilt)")
        self.budget_lr = float(budget_lr)
        self.exclude = list(exclude or [])
        self.seed = int(seed)

    @property
    def structured(self) -> bool:  # type: ignore[override]
        return self.granularity == "unit"

    def _check_sparsity(self, s: float) -> float:
        lo, hi = self.prior["clip"]
        if not 0.0 < s < 1.0:
            raise ValueError(f"method.sparsity={s} (default prune.sparsity) must be in (0, 1)")
        if not lo <= 1.0 - s <= hi:
            raise ValueError(f"method.sparsity={s}: the prior's kept fraction 1 - sparsity = {1 - s:.4g} must lie "
                             f"within method.prior.clip={[lo, hi]}; widen the clip")
        return s

    def target(self) -> tuple[float | None, str]:
        return self.sparsity, f"dllp_{self.granularity}s"

    # attach ----------------------------------------------------------------------------------------------
    def attach(self, ctx, model: nn.Module, schedule: Any) -> tuple[nn.Module, DLLPHook]:
        if self.sparsity is None:
            self.sparsity = self._check_sparsity(float(ctx.sparsity))
        if not getattr(schedule, "pretrained", True):
            log.warning("method=dllp: schedule.pretrained=false; the prior then comes from an untrained network")
        gen = torch.Generator().manual_seed(self.seed)
        data = None
        if self.prior["importance"] in FUNCTION_IMPORTANCES:
            # deterministic, non-augmented training batches: the same on every DDP rank (so is the prior)
            data = ctx.datamodule.score_batches(self.prior["batches"])
        self._frozen: list[nn.Parameter] = []
        if not self.train_weights:
            self._frozen = [p for p in model.parameters() if p.requires_grad]
            for p in self._frozen:
                p.requires_grad_(False)
        dmodel = attach_gates(
            model, self.granularity, self.prior["importance"], self.particles,
            target_density=1.0 - self.sparsity, temperature=self.prior["temperature"],
            clip=tuple(self.prior["clip"]), init=self.prior["init"], gate_mode=GATES[self.gate],
            exclude=self.exclude, generator=gen, data=data, bn_eval=not self.train_weights,
            example=example_batch(ctx, model),
        )
        dllp = DLLP(dmodel, train_set_size(ctx.datamodule), tau_start=self.tau["start"],
                    tau_end=self.tau["end"], tau_schedule=self.tau["schedule"], data_weight=self.data_weight,
                    density=1.0 - self.sparsity if self.budget_lr > 0 else None, dual_lr=self.budget_lr)
        return dmodel, DLLPHook(dllp, self.svgd["lr"], dllp.n_train, self.train_weights)

    # finish ----------------------------------------------------------------------------------------------
    def unit_masks(self, dllp: DLLP) -> dict[str, Tensor]:
        """The decision (``decision``), every gated layer keeping at least one unit."""
        if self.decision == "target":
            return dllp.unit_masks(target_sparsity=self.sparsity)
        keep = dllp.unit_masks(THRESHOLD)
        zs = dict(zip(dllp.model.site_names, dllp.particle_parameters()))
        for name, k in keep.items():
            if not k.any() and dllp.model.sites[dllp.model.site_names.index(name)].granularity == "unit":
                log.warning("dllp: every unit of %s has rho < 0.5; keeping its best unit", name)
                k[torch.argmax(zs[name].detach().mean(0))] = True
        return keep

    def heldout_batches(self, ctx) -> Iterator[tuple[Tensor, Tensor]]:
        dm = ctx.datamodule
        loader = dm.test_dataloader() if self.reliability_split == "test" else dm.val_dataloader()
        for i, (x, y) in enumerate(loader):
            if i >= self.reliability_batches:
                break
            yield dm.process_batch(x, y, train=False) if hasattr(dm, "process_batch") else (x, y)

    def finish(self, ctx, model: nn.Module, hook: DLLPHook) -> Finished:
        dllp = hook.dllp
        for p in getattr(self, "_frozen", []):   # frozen during the stage (train_weights=false); fine-tuning trains
            p.requires_grad_(True)
        dllp.model.bn_eval = False
        keep = self.unit_masks(dllp)
        pmasks = dllp.masks(keep=keep)
        dense = dllp.pruned_model(keep=keep).eval()
        example = torch.randn(4, *ctx.input_shape, generator=torch.Generator().manual_seed(self.seed))
        example = example.to(next(dense.parameters()).device)
        if self.granularity == "unit":
            units = [s.site for s in dllp.model.sites]
            small, left, compact_info = compact_units(dense, {s.layer: keep[s.layer] for s in units}, units, example)
        else:
            small, left = dense, MaskSet({n: m for n, m in pmasks.items() if not bool(m.all())})
            compact_info = {"groups_compacted": 0, "units_removed_physically": 0}
        small.eval()
        with torch.no_grad():
            ref, out = dense(example), small(example)
        diff = float((ref - out).abs().max())
        scale = max(1.0, float(ref.abs().max()))
        if diff > COMPACT_TOL * scale * 10:
            raise RuntimeError(f"dllp: compacted network differs from the masked one (max |diff| {diff:.3g})")
        rel = dllp.reliability(self.heldout_batches(ctx), deployed_model=small, keep=keep)
        small.train()
        info = self._record(dllp, keep, pmasks, rel, compact_info, diff, hook)
        if self.granularity == "weight":
            masks = MaskSet(pmasks)
            eff = effective_sparsity_report(dense, masks, tuple(ctx.input_shape))
            info["final"].update({"sparsity_direct": masks.sparsity(), "compression_direct": masks.compression(),
                                  "sparsity_effective": eff["sparsity_effective"],
                                  "compression_effective": eff["compression_effective"],
                                  "layer_collapse": bool(eff["layer_collapse"])})
        return Finished(small, left, info)

    def _record(self, dllp: DLLP, keep, pmasks, rel, compact_info, diff, hook) -> dict[str, Any]:
        rho = {n: torch.tensor(v, dtype=torch.float64) for n, v in rel.pop("rho").items()}
        se = {n: torch.tensor(v, dtype=torch.float64) for n, v in rel.pop("rho_se").items()}
        flat_rho, flat_se = torch.cat(list(rho.values())), torch.cat(list(se.values()))
        layers = {n: {"units": int(r.numel()), "kept": int(keep[n].sum()), "rho_mean": float(r.mean()),
                      "rho_se_mean": float(se[n].mean()),
                      "undecided": int(((r > 0.2) & (r < 0.8)).sum())} for n, r in rho.items()}
        hist = torch.histc(flat_rho.float(), bins=10, min=0.0, max=1.0).long().tolist()
        masked = sum(int((~m).sum()) for n, m in pmasks.items() if n.endswith("weight"))
        ens = rel["ensemble"]
        shift = rel["posterior_shift"]
        reliability = {
            **rel,
            "rho_summary": {"mean": float(flat_rho.mean()), "se_mean": float(flat_se.mean()),
                            "se_max": float(flat_se.max()), "histogram_10_bins": hist},
            "layers": layers,
        }
        if flat_rho.numel() <= RHO_LIST_LIMIT:
            reliability["rho"] = {n: r.tolist() for n, r in rho.items()}
            reliability["rho_se"] = {n: s.tolist() for n, s in se.items()}
        final = {
            "dllp_units_total": int(flat_rho.numel()),
            "dllp_units_kept": int(sum(int(k.sum()) for k in keep.values())),
            "dllp_unit_sparsity": rel["deployed_sparsity"],
            "dllp_rho_mean": float(flat_rho.mean()),
            "dllp_rho_se_mean": float(flat_se.mean()),
            "dllp_undecided_fraction": rel["undecided_fraction"],
            "dllp_particle_sparsity_mean": rel["particle_sparsity_mean"],
            "dllp_particle_sparsity_sd": rel["particle_sparsity_sd"],
            "dllp_ensemble_acc": ens["acc"],
            "dllp_ensemble_nll": ens["nll"],
            "dllp_ensemble_brier": ens["brier"],
            "dllp_ensemble_ece": ens["ece"],
            "dllp_ensemble_entropy": ens["entropy"],
            "dllp_ensemble_mutual_info": ens["mutual_info"],
            "dllp_particle_acc_mean": ens["particle_acc_mean"],
            "dllp_particle_acc_sd": ens["particle_acc_sd"],
            "dllp_particle_ece_mean": ens["particle_ece_mean"],
            "dllp_deployed_acc": rel["deployed_acc"],
            "dllp_agreement": rel["agreement"],
            "dllp_reliability_examples": int(ens["n_examples"]),
            "dllp_compact_max_abs_diff": diff,
            "dllp_posterior_shift": shift["mean_abs_diff"],
            "dllp_posterior_mode_flip_fraction": shift["mode_flip_fraction"],
            "dllp_posterior_kl": shift["kl"],
            "dllp_posterior_js": shift["js"],
            "dllp_particle_flip_fraction": shift["particle_flip_fraction"],
            "dllp_decision_vs_prior_fraction": shift["decision_vs_prior_fraction"],
            "dllp_budget_lam": float(dllp.lam),
        }
        metrics = {"dllp/" + k[len("dllp_"):]: float(v) for k, v in final.items()}
        return {
            "particles": self.particles, "granularity": self.granularity, "decision": self.decision,
            "sparsity": self.sparsity, "gate": self.gate, "tau": self.tau, "prior": self.prior,
            "train_weights": self.train_weights, "budget_lr": self.budget_lr,
            "svgd": self.svgd, "n_train": hook.n_train, "reliability_split": self.reliability_split,
            "weights_masked": masked, "compaction": compact_info, "history": hook.history,
            "reliability": reliability, "final": final, "metrics": metrics,
        }
