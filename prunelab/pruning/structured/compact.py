"""Physical removal of pruned units: a genuinely smaller dense model ("pruned but not faster" is the
complaint this answers).

:func:`compact` deep-copies the model, drops the gate hooks and removes every pruned channel from every conv,
linear and norm layer it touches -- the producers' output rows, BN channels (affine parameters and running
statistics) and the next layers' input columns (after flattening too) -- with Torch-Pruning's dependency
groups (``DG.get_pruning_group(root, prune_out_channels, idxs).prune()``). Because the gates zero the unit's
output after BN (shift included, see :mod:`.gates`), the layers reading a pruned channel see exactly 0
there, so removing the channel and its input columns leaves the function unchanged: the compacted model
equals the masked one up to float rounding.

:class:`CostModel` predicts the FLOPs and parameters of the compacted model from the group masks alone
(exact for standard and depthwise convolutions and linear layers), which is what the pruner's
``target_kind="flops" | "params"`` stopping rule measures.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence

import torch
from torch import nn

from prunelab.metrics.latency import count_params, flop_counts
from prunelab.pruning.structured.gates import strip_gate_hooks
from prunelab.pruning.structured.groups import (
    UNIT_TYPES,
    ChannelGroup,
    build_dependency_graph,
    pruned_member_indices,
)

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike


def _drop_indices(keep: torch.Tensor) -> list[int]:
    return (~keep.cpu().bool()).nonzero().flatten().tolist()


def _check_same_group(tp_group, names: dict[nn.Module, str], group: ChannelGroup, dg) -> None:
    """The group DepGraph builds in the copy must touch the same layers as the scored group."""
    got = set()
    for it in tp_group.items:
        m = it.dep.target.module
        if isinstance(m, nn.Module) and m in names and any(True for _ in m.parameters(recurse=False)):
            if dg.is_out_channel_pruning_fn(it.dep.handler):
                got.add(names[m])
    want = {mem.name for mem in group.producers()}
    if got != want:
        raise RuntimeError(f"group {group.id}: dependency graph of the copy differs ({sorted(got ^ want)})")


def compact(
    model: nn.Module,
    group_masks: dict[str, torch.Tensor],
    example_input: torch.Tensor,
    groups: Sequence[ChannelGroup] | None = None,
) -> nn.Module:
    """A smaller dense copy of ``model`` without the units whose mask is False.

    ``group_masks``: ``{group id (root layer name): bool tensor per unit, True = kept}``. The original model
    is not modified. Its outputs equal the masked model's (gates with these masks) in eval mode.
    """
    new = copy.deepcopy(model)
    strip_gate_hooks(new)
    dg = build_dependency_graph(new, example_input)
    names = {m: n for n, m in new.named_modules()}
    by_id = {g.id: g for g in groups} if groups is not None else {}
    for gid, keep in group_masks.items():
        drop = _drop_indices(keep)
        if not drop:
            continue
        if len(drop) >= keep.numel():
            raise ValueError(f"group {gid}: cannot remove all {keep.numel()} units")
        root = new.get_submodule(gid)
        pruner = dg.get_pruner_of_module(root)
        tp_group = dg.get_pruning_group(root, pruner.prune_out_channels, drop)
        if gid in by_id:
            _check_same_group(tp_group, names, by_id[gid], dg)
        tp_group.prune()
    logger.debug("compacted: %d -> %d parameters", count_params(model), count_params(new))
    return new


class CostModel:
    """FLOPs and parameter count of the compacted model, predicted from group masks.

    For each parameter, the kept size is the product of its kept sizes along the output dim (0) and, for
    conv / linear weights, the input dim (1); FLOPs of a conv / linear layer scale with the kept fraction of
    its weight (``FLOPs = 2 * output positions * weight elements``). Other FLOPs (matmuls outside modules)
    are taken as unchanged.
    """

    def __init__(self, model: nn.Module, groups: Sequence[ChannelGroup], input_shape: Sequence[int]):
        self.groups = list(groups)
        self.total_flops, per_module = flop_counts(model, input_shape)
        self.total_params = count_params(model)
        self._params: dict[str, tuple[int, ...]] = {}
        self._module_flops: dict[str, tuple[str, int]] = {}
        for mname, module in model.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                self._params[f"{mname}.{pname}" if mname else pname] = tuple(p.shape)
            if isinstance(module, UNIT_TYPES) and mname in per_module:
                self._module_flops[mname] = (f"{mname}.weight" if mname else "weight", per_module[mname])
        # (group id, member name, kind) -> list of parameter names and the dim the member prunes
        self._touch: list[tuple[ChannelGroup, object, str, int]] = []
        for g in self.groups:
            for mem in g.members:
                module = model.get_submodule(mem.name)
                for pname, p in module.named_parameters(recurse=False):
                    dim = 0 if mem.kind == "out" else 1
                    if p.dim() <= dim or (mem.kind == "in" and pname != "weight"):
                        continue
                    self._touch.append((g, mem, f"{mem.name}.{pname}" if mem.name else pname, dim))

    def _kept_shapes(self, group_masks: dict[str, torch.Tensor]) -> dict[str, list[int]]:
        removed: dict[tuple[str, int], int] = {}
        for g, mem, pname, dim in self._touch:
            keep = group_masks.get(g.id)
            if keep is None:
                continue
            n = int(pruned_member_indices(mem, keep).numel())
            if n:
                removed[(pname, dim)] = removed.get((pname, dim), 0) + n
        touched = {pname for pname, _ in removed}
        shapes = {k: list(self._params[k]) for k in touched}
        for (pname, dim), n in removed.items():
            shapes[pname][dim] -= n
        return shapes

    def estimate(self, group_masks: dict[str, torch.Tensor]) -> tuple[int, int]:
        """``(flops, params)`` of ``compact(model, group_masks)`` (per sample, FlopCounterMode units)."""
        shapes = self._kept_shapes(group_masks)
        params = self.total_params
        for pname, shape in shapes.items():
            params -= _numel(self._params[pname]) - _numel(shape)
        flops = self.total_flops
        for wname, f in self._module_flops.values():
            if wname in shapes:
                full, kept = _numel(self._params[wname]), _numel(shapes[wname])
                flops -= f - (f * kept) // full
        return flops, params

    def reduction(self, group_masks: dict[str, torch.Tensor]) -> tuple[float, float]:
        """Removed fraction ``(1 - flops / flops_0, 1 - params / params_0)``."""
        f, p = self.estimate(group_masks)
        return 1.0 - f / self.total_flops, 1.0 - p / self.total_params


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# ---------------------------------------------------------------------------------------------------------
# serialisation
# ---------------------------------------------------------------------------------------------------------
def save_compact(model: nn.Module, path: PathLike) -> None:
    """Save the compacted model as a full pickled module (``torch.save(model)``): the smaller layer shapes
    travel with it, so no class surgery is needed to load it. Gate hooks are removed first (on a copy)."""
    model = copy.deepcopy(model)
    strip_gate_hooks(model)
    torch.save(model, path)


def load_compact(path: PathLike, map_location: str | torch.device | None = "cpu") -> nn.Module:
    """Load a model saved by :func:`save_compact` (trusted files only: full unpickling)."""
    return torch.load(path, map_location=map_location, weights_only=False)


def export_onnx(model: nn.Module, path: PathLike, example_input: torch.Tensor, opset: int = 17) -> None:
    """Export the (compacted) model to ONNX in eval mode with a dynamic batch dimension."""
    model = copy.deepcopy(model)
    strip_gate_hooks(model)
    model.eval()
    with torch.no_grad():
        torch.onnx.export(
            model, (example_input,), str(path), input_names=["input"], output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=opset, dynamo=False,
        )
