"""Structured pruning as a pipeline method (``method=taylor_fo``, ``taylor_fo_weight``, ``taylor_so``,
``l2_norm``, ``bn_scale``, ``random_structured``, ``oracle``): Molchanov et al., "Importance Estimation for
Neural Network Pruning", CVPR 2019.

- ``schedule=iterative_structured``: during fine-tuning, every ``frequency`` minibatches the ``k`` units with
  the lowest scores (EMA of interval means, momentum ``ema``) are removed globally, until the target
  (``target_kind``: ``units``, ``flops`` or ``params``; ``amount``: the fraction removed, or a number of
  units) is reached; the stage then stops and the model is compacted.
- ``schedule=oneshot``: score on ``prune.score_batches`` batches, remove units until the target, compact.

After pruning the gated model is compacted (:func:`~prunelab.pruning.units.compact.compact`) into a
smaller dense network, which is what fine-tuning trains and what is measured (params, FLOPs, latency).
Under DDP the interval sums of the scores are averaged across ranks before every pruning step, so every
rank removes the same units.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunelab.pruning.method import Finished, TrainingMethod, check_choice
from prunelab.pruning.structured import criteria as C
from prunelab.pruning.structured.pruner import TARGET_KINDS, PruneSchedule, StructuredPruner, removed_counts
from prunelab.pruning.units.groups import RESIDUAL_GATES, block_output_gates, build_groups
from prunelab.training.hooks import TrainHook, masks_checksum

log = logging.getLogger(__name__)

class StructuredHook(TrainHook):
    """Accumulates the criterion after every backward pass and prunes ``k`` units every ``frequency``
    minibatches; asks the stage to stop once the target is reached."""

    def __init__(self, pruner: StructuredPruner):
        self.pruner = pruner
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.history: list[dict[str, float]] = []
        self._done = pruner.done()

    def on_train_start(self, module) -> None:
        self.pruner.gates.to(module.device)

    def loss(self, module, x, y):
        if self.pruner.crit.kind == "passes":
            self._batch = (x, y)
        return super().loss(module, x, y)

    def after_backward(self, module, batch_idx: int) -> None:
        p = self.pruner
        if p.crit.kind == "gradient":
            p.accumulate()
        p.gates.zero_grad()

    def after_step(self, module, batch_idx: int) -> None:
        p = self.pruner
        if p.crit.kind == "passes" and self._batch is not None:
            p.accumulate_batch(*self._batch)  # after the optimiser step: its own passes clear the gradients
            self._batch = None
        removed = p.tick(before_step=lambda: p.acc.map_interval(
            lambda s: module.all_reduce_mean(s.to(module.device)).cpu()))
        if removed is None:
            return
        self._done = p.done()
        self.history.append({"batch": p.batches_seen, "removed": removed, "pruned_units": p.pruned_units(),
                             "progress": p.progress(), "ranks_agree": module.check_ranks_agree(
                                 masks_checksum(p.gates.mask.values()), "structured pruning: removed units")})

    def should_stop(self) -> bool:
        # the target can only be reached by a pruning step: no cost-model evaluation on every minibatch
        return self._done

    def on_epoch_end(self, module) -> dict[str, float]:
        p = self.pruner
        return {"structure/pruned_units": float(p.pruned_units()),
                f"structure/removed_{p.schedule.target_kind}": float(p.progress())}

    def state_dict(self) -> dict[str, Any]:
        p = self.pruner
        return {"mask": {g: m.cpu() for g, m in p.gates.mask.items()}, "acc": p.acc.state_dict(),
                "batches_seen": p.batches_seen, "history": self.history, "generator": p.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        p = self.pruner
        p.gates.set_masks(state["mask"])
        p.acc.load_state_dict(state["acc"])
        p.batches_seen, self.history = state["batches_seen"], list(state["history"])
        self._done = p.done()
        p.generator.set_state(state["generator"])


class StructuredMethod(TrainingMethod):
    supports_one_shot = True

    def __init__(self, criterion: str = "taylor_fo", amount: float = 0.5, target_kind: str = "flops",
                 ema: float = 0.9, normalize: str | None = None, hessian: str = "exact", samples: int = 1,
                 min_units: int = 1, seed: int = 0, residual_gates: str = "producers"):
        self.criterion = C.check_criterion(criterion)
        self.name = criterion
        check_choice("method.target_kind", target_kind, TARGET_KINDS)
        amount = float(amount)
        if target_kind != "units" and not 0.0 <= amount < 1.0:
            raise ValueError(f"method.amount={amount}: the fraction of {target_kind} to remove must be in [0, 1)")
        if amount < 0:
            raise ValueError(f"method.amount={amount} must be >= 0")
        if not 0.0 <= float(ema) < 1.0:
            raise ValueError(f"method.ema={ema} must be in [0, 1)")
        check_choice("method.normalize", normalize, (None, *C.NORMALIZATIONS))
        check_choice("method.hessian", hessian, ("exact", "hutchinson"))
        check_choice("method.residual_gates", residual_gates, RESIDUAL_GATES)
        self.amount, self.target_kind = amount, target_kind
        self.ema, self.normalize, self.hessian, self.samples = float(ema), normalize, hessian, int(samples)
        self.min_units, self.seed, self.residual_gates = int(min_units), int(seed), residual_gates

    def target(self) -> tuple[float | None, str]:
        return self.amount, f"structured_{self.target_kind}"

    def check_model(self, model: nn.Module, input_shape: tuple[int, ...]) -> None:
        """Before any training: ``residual_gates=block_output`` needs ResNet-style residual groups
        (``ValueError`` naming the option otherwise)."""
        if self.residual_gates == "block_output":
            example = torch.zeros(2, *input_shape, device=next(model.parameters()).device)
            block_output_gates(model, build_groups(model, example), example)

    @property
    def needs_data(self) -> bool:
        return C.get_criterion(self.criterion).needs_data

    def pruner(self, ctx, model: nn.Module, frequency: int = 30, k: int = 100) -> StructuredPruner:
        example = torch.zeros(2, *ctx.input_shape, device=next(model.parameters()).device)
        schedule = PruneSchedule(frequency=int(frequency), k=int(k), target=self.amount, target_kind=self.target_kind)
        return StructuredPruner(model, example, self.criterion, ema=self.ema, normalize=self.normalize,
                                schedule=schedule, loss_fn=F.cross_entropy, hessian=self.hessian,
                                samples=self.samples, min_units=self.min_units, seed=self.seed,
                                residual_gates=self.residual_gates)

    def attach(self, ctx, model: nn.Module, schedule: Any) -> tuple[nn.Module, TrainHook]:
        return model, StructuredHook(self.pruner(ctx, model, schedule.frequency, schedule.k))

    def finish(self, ctx, model: nn.Module, hook: StructuredHook) -> Finished:
        p = hook.pruner
        if not p.done():
            if p.acc.count or p.acc.ema is not None or not p.crit.needs_data:
                log.warning("structured target not reached during training (%.3f of %s removed, target %s): "
                            "removing the rest now with the current scores", p.progress(), self.target_kind,
                            self.amount)
                p.step(k=p.total_units, stop_at_target=True)
        return self._compact(p, {"history": hook.history})

    def one_shot(self, ctx, model: nn.Module, batches: list) -> Finished:
        p = self.pruner(ctx, model)
        was_training = model.training
        model.train()
        p.one_shot(batches, self.amount, self.target_kind)
        model.train(was_training)
        return self._compact(p, {})

    def _compact(self, p: StructuredPruner, info: dict[str, Any]) -> Finished:
        small = p.compact()
        counts = removed_counts(p.groups, p.gates.mask)
        p.remove_gates()
        info.update({
            "name": self.name, "criterion": self.criterion, "target_kind": self.target_kind,
            "amount": self.amount, "units_total": p.total_units, "units_removed": p.pruned_units(),
            "removed_per_layer": counts,
            "metrics": {"structure/units_removed": p.pruned_units(),
                        "structure/units_removed_frac": p.pruned_units() / max(1, p.total_units)},
        })
        # the gates prune whole dependency groups: every pruned unit is removed, nothing is left to mask
        return Finished(small, None, info)
