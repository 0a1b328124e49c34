"""Network slimming (Liu, Li, Shen, Huang, Yan, Zhang, "Learning Efficient Convolutional Networks through
Network Slimming", ICCV 2017) as a pipeline method: ``method=slimming schedule=train_prune``.

1. Sparsity training (``attach``): every step adds the subgradient of the L1 penalty
   ``lambda * sum_gamma |gamma|`` over the BatchNorm scales of every prunable unit to the gradients, after the
   backward pass and before the optimiser step -- as the authors' code does
   (``m.weight.grad.data.add_(s * torch.sign(m.weight.data))``): ``d/dgamma lambda |gamma| = lambda sign(gamma)``.
2. Pruning (``finish``): the units with the smallest ``|gamma|`` over the whole network (one global
   threshold) are removed until ``amount`` of ``target_kind`` is removed (a fraction of the units by default;
   a layer keeps at least ``min_units``), and the network is compacted. A unit of a residual-coupled group is
   scored by the sum of its BatchNorms' ``|gamma|`` (the criterion ``bn_scale``).

Everything else (dependency groups, gates, compaction) is the units' ground floor and the structured pruner;
this file holds only the method's own mathematics: the penalty and when it is applied.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prunelab.pruning.method import Finished, check_choice
from prunelab.pruning.structured.method import StructuredMethod
from prunelab.pruning.structured.pruner import TARGET_KINDS
from prunelab.pruning.units.groups import build_groups
from prunelab.pruning.units.layers import BN_TYPES
from prunelab.training.hooks import TrainHook


def l1_subgradient(bns: list[nn.Module], lam: float) -> None:
    """Add ``lam * sign(gamma)`` (the subgradient of ``lam * |gamma|``) to every BatchNorm scale's gradient."""
    with torch.no_grad():
        for bn in bns:
            if bn.weight.grad is None:
                bn.weight.grad = torch.zeros_like(bn.weight)
            bn.weight.grad.add_(lam * torch.sign(bn.weight))


class SlimmingHook(TrainHook):
    """Sparsity training: the L1 subgradient on the BatchNorm scales after every backward pass."""

    def __init__(self, bns: list[nn.Module], lam: float):
        self.bns, self.lam = bns, float(lam)

    def after_backward(self, module, batch_idx: int) -> None:
        l1_subgradient(self.bns, self.lam)

    def on_epoch_end(self, module) -> dict[str, float]:
        with torch.no_grad():
            gammas = torch.cat([bn.weight.detach().abs().flatten() for bn in self.bns])
        return {"slimming/l1": float(gammas.sum()), "slimming/gamma_below_1e-2": float((gammas < 1e-2).double().mean())}


class SlimmingMethod(StructuredMethod):
    """``amount`` of ``target_kind`` removed after sparsity training with ``sparsity`` = lambda (the paper:
    1e-4 for VGGNet, 1e-5 for ResNet and DenseNet on CIFAR)."""

    supports_one_shot = False

    def __init__(self, amount: float = 0.5, target_kind: str = "units", sparsity: float = 1e-4, min_units: int = 1,
                 seed: int = 0):
        check_choice("method.target_kind", target_kind, TARGET_KINDS)
        super().__init__(criterion="bn_scale", amount=amount, target_kind=target_kind, min_units=min_units, seed=seed)
        if not float(sparsity) >= 0.0:
            raise ValueError(f"method.sparsity={sparsity}: the L1 weight lambda must be >= 0")
        self.name, self.sparsity = "slimming", float(sparsity)

    def attach(self, ctx, model: nn.Module, schedule: Any) -> tuple[nn.Module, SlimmingHook]:
        example = torch.zeros(2, *ctx.input_shape, device=next(model.parameters()).device)
        bns = []
        for g in build_groups(model, example):
            for mem in g.producers():
                m = model.get_submodule(mem.name)
                if isinstance(m, BN_TYPES) and m not in bns:
                    bns.append(m)
        order = {m: i for i, m in enumerate(model.modules())}
        bns.sort(key=order.__getitem__)  # registration order
        if not bns:
            raise ValueError("method=slimming needs BatchNorm layers after the prunable layers (it penalises "
                             "their scales); this model has none: use method=l2_norm or taylor_fo")
        return model, SlimmingHook(bns, self.sparsity)

    def finish(self, ctx, model: nn.Module, hook: TrainHook) -> Finished:
        p = self.pruner(ctx, model)
        p.step(k=p.total_units, stop_at_target=True, target=self.amount, target_kind=self.target_kind)
        return self._compact(p, {"sparsity": self.sparsity})
