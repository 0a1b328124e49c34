"""Iterative structured pruning (Molchanov et al., CVPR 2019, Sec. 3.4 / Alg.): every ``frequency`` minibatches
remove the ``k`` globally least important units, until a target of units, FLOPs or parameters is reached;
or one-shot. The pruner only masks (through the gates); :func:`.compact.compact` then produces the smaller
dense model.

Use from a training loop::

    pruner = StructuredPruner(model, example_input, "taylor_fo", schedule=PruneSchedule(30, 100, 0.5, "flops"))
    for x, y in loader:
        loss = F.cross_entropy(model(x), y); opt.zero_grad(); loss.backward()
        pruner.after_backward()          # accumulate gate gradients, prune on schedule
        opt.step(); pruner.apply_masks() # keep pruned parameters at 0 (optional: the gates already mask)
        if pruner.done(): break
    small = pruner.compact()
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from prunelab.pruning.method import check_choice
from prunelab.pruning.structured import criteria as C
from prunelab.pruning.units.compact import CostModel, compact
from prunelab.pruning.units.gates import Gates
from prunelab.pruning.units.groups import (
    RESIDUAL_GATES,
    ChannelGroup,
    block_output_gates,
    build_groups,
    param_masks,
    pruned_member_indices,
)

logger = logging.getLogger(__name__)

TARGET_KINDS = ("units", "flops", "params")


@dataclass
class PruneSchedule:
    """Remove ``k`` units every ``frequency`` minibatches until ``target`` (of ``target_kind``) is reached.

    ``target_kind="units"``: number of units to remove (int) or fraction of all prunable units (float < 1);
    ``"flops"`` / ``"params"``: fraction of the model's FLOPs / parameters to REMOVE (0.5 = half of them),
    measured on what :func:`compact` would produce.
    """

    frequency: int = 30
    k: int = 100
    target: float = 0.5
    target_kind: str = "flops"

    def __post_init__(self) -> None:
        if self.target_kind not in TARGET_KINDS:
            raise ValueError(f"target_kind must be one of {TARGET_KINDS}, got {self.target_kind!r}")
        if self.frequency < 1 or self.k < 1:
            raise ValueError("schedule frequency and k must be >= 1")


def per_group_masks(scores: C.Scores, amount: float, min_units: int = 1) -> dict[str, torch.Tensor]:
    """Uniform pruning: in every group remove the ``round(amount * n)`` lowest-scoring units (keeping at
    least ``min_units``)."""
    out: dict[str, torch.Tensor] = {}
    for gid, s in scores.items():
        n = s.numel()
        drop = min(int(round(amount * n)), n - min_units)
        keep = torch.ones(n, dtype=torch.bool)
        if drop > 0:
            keep[torch.argsort(s, stable=True)[:drop]] = False
        out[gid] = keep
    return out


class StructuredPruner:
    """Scores units with ``criterion`` (see :mod:`.criteria`), masks the lowest globally, measures the cost.

    ``ema``: momentum of the moving average of interval scores across pruning steps; ``normalize``: per-group
    normalisation (``none``/``l2``/``mean``) applied before the global ranking; ``loss_fn`` is used by
    :meth:`accumulate_batch` / :meth:`one_shot`; ``hessian``/``samples`` by ``taylor_so``; ``residual_gates``:
    ``producers`` (gate every producer of a residual channel before the addition) or ``block_output`` (Molchanov
    et al.'s code: each block's output, one gate per stage, the stem never pruned; see
    :func:`~prunelab.pruning.units.groups.block_output_gates`).
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: torch.Tensor,
        criterion: str = "taylor_fo",
        ema: float = 0.9,
        normalize: str | None = None,
        schedule: PruneSchedule | None = None,
        loss_fn: C.LossFn = F.cross_entropy,
        hessian: str = "exact",
        samples: int = 1,
        groups: Sequence[ChannelGroup] | None = None,
        ignored_layers: Sequence[nn.Module] | None = None,
        min_units: int = 1,
        seed: int = 0,
        residual_gates: str = "producers",
    ):
        check_choice("method.residual_gates", residual_gates, RESIDUAL_GATES)
        self.model = model
        self.example_input = example_input
        self.criterion = C.check_criterion(criterion)
        self.crit = C.get_criterion(criterion)
        self.normalize = normalize
        C.normalize_scores({}, {}, normalize)  # validate
        self.schedule = schedule or PruneSchedule()
        self.loss_fn = loss_fn
        self.hessian, self.samples = hessian, samples
        self.min_units = max(1, int(min_units))
        self.groups = list(groups) if groups is not None else build_groups(model, example_input, ignored_layers)
        if residual_gates == "block_output":
            self.groups = block_output_gates(model, self.groups, example_input)
        self.gates = Gates(model, self.groups)
        self.cost = CostModel(model, self.groups, tuple(example_input.shape[1:]))
        self.acc = C.ScoreAccumulator(ema)
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_seen = 0
        self.total_units = sum(g.num_units for g in self.groups)

    # scoring ----------------------------------------------------------------------------------------------
    def accumulate(self) -> None:
        """Read the gradients of the last backward pass (``taylor_fo``: gate grads, ``taylor_fo_weight``:
        parameter grads) into the interval average. Data-free criteria need nothing (no-op)."""
        if self.crit.kind == "gradient":
            self.acc.add(self.crit.from_gradients(self.model, self.gates, self.groups))
        elif self.crit.kind == "passes":
            raise RuntimeError(f"criterion {self.criterion} needs its own passes: use accumulate_batch(x, y)")
        self.gates.zero_grad()

    def accumulate_batch(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Score one minibatch with its own forward/backward (any data criterion, incl. taylor_so, oracle).
        Parameter gradients are cleared afterwards."""
        if self.crit.kind == "static":
            return
        s = self.crit.batch(self.model, self.gates, self.groups, (inputs, targets), self.loss_fn, self.hessian,
                            self.samples)
        self.acc.add(s)
        self.gates.zero_grad()
        self.model.zero_grad(set_to_none=True)

    def scores(self, update: bool = True) -> C.Scores:
        """Current ranking scores: the EMA of interval means (updated with the current interval when
        ``update``), or the data-free criterion; pruned units 0, per-group normalisation applied."""
        if self.crit.kind == "static":
            raw = self.crit.static(self.model, self.groups, self.generator)
        elif update and self.acc.count > 0:
            raw = self.acc.update()
        elif self.acc.ema is not None:
            raw = self.acc.ema
        else:
            raise RuntimeError(f"no {self.criterion} scores accumulated yet: call accumulate() after backward")
        return C.normalize_scores(raw, self.gates.mask, self.normalize)

    # cost -------------------------------------------------------------------------------------------------
    def pruned_units(self, masks: dict[str, torch.Tensor] | None = None) -> int:
        masks = masks if masks is not None else self.gates.mask
        return int(sum((~m).sum() for m in masks.values()))

    def progress(self, target_kind: str | None = None, masks: dict[str, torch.Tensor] | None = None) -> float:
        """Removed units (count) or removed fraction of FLOPs / params of the compacted model."""
        kind = target_kind or self.schedule.target_kind
        masks = masks if masks is not None else self.gates.mask
        if kind == "units":
            return float(self.pruned_units(masks))
        flops_red, params_red = self.cost.reduction(masks)
        return flops_red if kind == "flops" else params_red

    def _target_value(self, target: float, kind: str) -> float:
        if kind not in TARGET_KINDS:
            raise ValueError(f"target_kind must be one of {TARGET_KINDS}, got {kind!r}")
        if kind == "units" and isinstance(target, float) and 0.0 < target < 1.0:
            return float(round(target * self.total_units))
        return float(target)

    def done(self, target: float | None = None, target_kind: str | None = None,
             masks: dict[str, torch.Tensor] | None = None) -> bool:
        kind = target_kind or self.schedule.target_kind
        goal = self._target_value(self.schedule.target if target is None else target, kind)
        return self.progress(kind, masks) >= goal - 1e-12

    # pruning ----------------------------------------------------------------------------------------------
    def _removal_order(self, scores: C.Scores) -> list[tuple[str, int]]:
        """Kept units, lowest score first, never taking a group below ``min_units``."""
        cands = []
        for gid, s in scores.items():
            keep = self.gates.mask[gid]
            for u in keep.nonzero().flatten().tolist():
                cands.append((float(s[u]), gid, u))
        cands.sort(key=lambda t: t[0])
        left = {gid: int(m.sum()) for gid, m in self.gates.mask.items()}
        order = []
        for _, gid, u in cands:
            if left[gid] > self.min_units:
                left[gid] -= 1
                order.append((gid, u))
        return order

    def _masks_after(self, order: list[tuple[str, int]], n: int) -> dict[str, torch.Tensor]:
        masks = {gid: m.clone() for gid, m in self.gates.mask.items()}
        for gid, u in order[:n]:
            masks[gid][u] = False
        return masks

    def step(self, k: int | None = None, stop_at_target: bool = True, target: float | None = None,
             target_kind: str | None = None) -> int:
        """Mask the ``k`` lowest-scoring units globally (fewer if the target is reached first, found by
        bisection on the removal order). Returns the number of units removed."""
        k = self.schedule.k if k is None else int(k)
        order = self._removal_order(self.scores())
        n = min(k, len(order))
        if stop_at_target and n > 0:
            if self.done(target, target_kind):
                return 0
            lo, hi = 1, n  # smallest prefix reaching the target, else n
            if self.done(target, target_kind, self._masks_after(order, n)):
                while lo < hi:
                    mid = (lo + hi) // 2
                    if self.done(target, target_kind, self._masks_after(order, mid)):
                        hi = mid
                    else:
                        lo = mid + 1
                n = lo
        self.gates.set_masks(self._masks_after(order, n))
        if self.acc.ema is not None:
            self.acc.ema = {gid: s * self.gates.mask[gid] for gid, s in self.acc.ema.items()}
        logger.info("structured step: removed %d units (%d/%d pruned)", n, self.pruned_units(), self.total_units)
        return n

    def tick(self, before_step: Callable[[], None] | None = None) -> int | None:
        """Count one minibatch; every ``frequency`` minibatches, unless the target is reached, call
        ``before_step`` (e.g. average the interval scores over DDP ranks) and prune ``k`` units. Returns the
        number removed, or None when no pruning step was due."""
        self.batches_seen += 1
        if self.batches_seen % self.schedule.frequency or self.done():
            return None
        if before_step is not None:
            before_step()
        return self.step(self.schedule.k)

    def after_backward(self) -> int:
        """Training-loop hook: accumulate, and every ``frequency`` minibatches prune ``k`` units unless the
        target is reached. Returns the number of units removed at this call."""
        if self.crit.kind != "static":
            self.accumulate()
        return self.tick() or 0

    def one_shot(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], amount: float,
                 target_kind: str = "units") -> int:
        """Score on ``batches`` (ignored by data-free criteria) and remove units until ``amount`` (see
        :class:`PruneSchedule` for its meaning per ``target_kind``)."""
        if self.crit.kind != "static":
            for x, y in batches:
                self.accumulate_batch(x, y)
        return self.step(k=self.total_units, stop_at_target=True, target=amount, target_kind=target_kind)

    # masks ------------------------------------------------------------------------------------------------
    def masks(self) -> dict[str, torch.Tensor]:
        """Per-group bool masks (True = kept), keyed by group id (root layer name)."""
        return {gid: m.clone() for gid, m in self.gates.mask.items()}

    def param_masks(self) -> dict[str, torch.Tensor]:
        """The same masks in prunelab's per-parameter convention (see :func:`.groups.param_masks`)."""
        return param_masks(self.model, self.groups, self.gates.mask)

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the parameters of pruned units (producers' rows, BN affine, consumers' input columns).
        Together with the gates this keeps them at 0 whatever the optimiser does."""
        params = dict(self.model.named_parameters())
        for name, m in self.param_masks().items():
            params[name].mul_(m)

    def compact(self) -> nn.Module:
        """The smaller dense model (see :func:`.compact.compact`)."""
        return compact(self.model, self.masks(), self.example_input, self.groups)

    def remove_gates(self) -> None:
        self.gates.remove()


def removed_counts(groups: Sequence[ChannelGroup], masks: dict[str, torch.Tensor]) -> dict[str, int]:
    """Per producer layer, the number of output channels removed (for reports)."""
    out: dict[str, int] = {}
    for g in groups:
        for mem in g.producers():
            out[mem.name] = int(pruned_member_indices(mem, masks[g.id]).numel())
    return out
