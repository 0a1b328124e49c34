"""Physical removal of pruned units: a genuinely smaller dense model ("pruned but not faster" is the
complaint this answers).

:func:`compact` deep-copies the model, drops the gate hooks and removes every pruned channel from every conv,
linear and norm layer it touches -- the producers' output rows, BN channels (affine parameters and running
statistics) and the next layers' input columns (after flattening too) -- with Torch-Pruning's dependency
groups (``DG.get_pruning_group(root, prune_out_channels, idxs).prune()``). :func:`compact_units` is the entry point
of the families that mask units per layer (BMRS, DLLP): it removes what can be removed and returns a
:class:`~prunelab.pruning.masks.MaskSet` for the rest. Because the gates zero the unit's
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
from prunelab.pruning.masks import MaskSet
from prunelab.pruning.units.gates import strip_gate_hooks
from prunelab.pruning.units.groups import (
    ChannelGroup,
    build_dependency_graph,
    build_groups,
    pruned_member_indices,
    removable_group_masks,
)
from prunelab.pruning.units.layers import UNIT_TYPES
from prunelab.pruning.units.sites import LayerSite, site_param_masks

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


def compact_units(
    model: nn.Module,
    keep: dict[str, torch.Tensor],
    sites: Sequence[LayerSite],
    example_input: torch.Tensor,
) -> tuple[nn.Module, MaskSet | None, dict[str, int]]:
    """Remove the pruned units of a plain (multiplier-free) ``model`` physically: the one compaction of every
    family that masks units per layer (BMRS noise, DLLP gates; the Taylor gates' group masks go straight to
    :func:`compact`).

    ``keep``: ``{site layer name: bool (units,)}`` (True = kept); the pruned units' parameters must already
    be zero in ``model`` wherever :func:`~.sites.site_param_masks` says they own them. A unit of a
    dependency group is removed iff every conv / linear layer producing it has a mask that prunes it (so the
    channel is zero wherever it is read, residual coupling included); a group never loses all its units.
    Units pruned but not removable stay, exactly zero, and are returned as a :class:`MaskSet` over the
    compacted network's parameters (``None`` when every pruned unit was removed) for fine-tuning to enforce.
    Returns ``(compact model, masks, info)``."""
    groups = build_groups(model, example_input)
    group_masks = removable_group_masks(
        groups, keep, counts=lambda mem: isinstance(model.get_submodule(mem.name), UNIT_TYPES))
    small = compact(model, group_masks, example_input, groups) if group_masks else copy.deepcopy(model)
    pmasks = site_param_masks(model, sites, keep, example_input, groups)
    # The masks of the compacted network: compact a copy whose parameters ARE the masks (the channel removal
    # only selects indices, so it maps every mask entry onto its parameter's entry).
    mask_net = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in mask_net.named_parameters():
            p.copy_(pmasks[name].to(p.dtype) if name in pmasks else torch.ones_like(p))
    small_masks = compact(mask_net, group_masks, example_input, groups) if group_masks else mask_net
    left = {n: p.detach() > 0.5 for n, p in small_masks.named_parameters()}
    left = {n: m for n, m in left.items() if not bool(m.all())}
    if left:  # what the unremoved pruned units own is zero (it only ever fed their zero channel)
        MaskSet(left).apply(small)
    removed = int(sum(int((~m).sum()) for m in group_masks.values()))
    pruned = int(sum(int((~k.bool()).sum()) for k in keep.values()))
    info = {"groups": len(groups), "groups_compacted": len(group_masks), "units_removed_physically": removed,
            "units_pruned": pruned, "units_masked_not_removed": pruned_not_removed(keep, sites, groups, group_masks),
            "params_zero_masked": len(left)}
    return small, (MaskSet(left) if left else None), info


def pruned_not_removed(keep: dict[str, torch.Tensor], sites: Sequence[LayerSite], groups: Sequence[ChannelGroup],
                       group_masks: dict[str, torch.Tensor]) -> int:
    """Pruned units (per site) that the compaction did not remove."""
    removed: dict[str, set[int]] = {}
    for g in groups:
        if g.id in group_masks:
            for mem in g.producers():
                removed.setdefault(mem.name, set()).update(pruned_member_indices(mem, group_masks[g.id]).tolist())
    n = 0
    for site in sites:
        k = keep.get(site.layer)
        if k is not None:
            gone = removed.get(site.layer, set())
            n += sum(1 for i in (~k.cpu().bool()).nonzero().flatten().tolist() if i not in gone)
    return n


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
