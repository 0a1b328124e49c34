"""Prunable units and their dependency groups, found by Torch-Pruning's DepGraph.

A *unit* is a neuron (output feature of a ``nn.Linear``) or a filter (output channel of a convolution). Units
that must disappear together -- the channels summed by a residual addition, the channels of a depthwise conv
and of the conv feeding it, a BatchNorm's channels and the conv before it, the input columns of every layer
that reads them (after flattening too) -- form one :class:`ChannelGroup`. The groups come from
``tp.DependencyGraph().build_dependency(model, example_inputs)`` and
``DG.get_all_groups(root_module_types=[Conv, Linear], ignored_layers=[classifier])`` (Fang et al., "DepGraph:
Towards Any Structural Pruning", CVPR 2023), so no model needs special casing: the classifier's outputs are
never pruned, everything else that DepGraph can trace is.

Conventions: unit ``u`` of a group is the ``u``-th output channel of the group's *root* layer (the conv or
linear layer DepGraph starts the group from); every member stores which of its own channel (or input
feature) indices belong to which unit (``idxs[i]`` belongs to unit ``root_idxs[i]``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from prunelab.pruning.units.layers import BN_TYPES, NORM_TYPES, UNIT_TYPES, channel_dim

logger = logging.getLogger(__name__)

RESIDUAL_GATES = ("producers", "block_output")


@dataclass(frozen=True)
class GroupMember:
    """One layer touched by a group.

    ``kind`` is ``"out"`` when the layer's output channels (rows of the weight, BN channels) are the group's
    units, ``"in"`` when its inputs (weight columns) are. ``idxs`` are the layer's own indices, ``root_idxs``
    the unit each of them belongs to (equal for plain chains, one unit to many features after a flatten).
    """

    name: str
    kind: str
    layer_type: str
    idxs: tuple[int, ...]
    root_idxs: tuple[int, ...]


@dataclass(frozen=True)
class GateSite:
    """Where a gate multiplies the group's units: after module ``name``, along dimension ``dim``."""

    name: str
    dim: int


@dataclass
class ChannelGroup:
    """A set of coupled units scored and pruned together (see the module docstring)."""

    id: str
    members: list[GroupMember]
    num_units: int
    gates: list[GateSite] = field(default_factory=list)

    @property
    def root(self) -> str:
        """Name of the layer whose output channels define the units."""
        return self.id

    def producers(self) -> list[GroupMember]:
        """Members whose *output* channels are the units (convs, linears, norms)."""
        return [m for m in self.members if m.kind == "out"]

    def consumers(self) -> list[GroupMember]:
        """Members reading the units as inputs."""
        return [m for m in self.members if m.kind == "in"]

    def has_norm(self) -> bool:
        return any(m.layer_type in {t.__name__ for t in BN_TYPES} for m in self.producers())


def find_classifier(model: nn.Module) -> nn.Module:
    """The output layer whose outputs must never be pruned: timm's ``get_classifier()`` when available,
    otherwise the last registered ``nn.Linear`` / conv layer."""
    getter = getattr(model, "get_classifier", None)
    if callable(getter):
        clf = getter()
        if isinstance(clf, nn.Module) and any(True for _ in clf.parameters()):
            return clf
    last = None
    for m in model.modules():
        if isinstance(m, UNIT_TYPES):
            last = m
    if last is None:
        raise ValueError("model has no conv or linear layer: nothing to prune structurally")
    return last


def build_dependency_graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """Trace ``model`` on ``example_input`` in eval mode (BatchNorm statistics are left untouched)."""
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_input, verbose=False)
    finally:
        model.train(was_training)
    return dg


def _kind(dg: tp.DependencyGraph, handler) -> str | None:
    if dg.is_out_channel_pruning_fn(handler):
        return "out"
    if dg.is_in_channel_pruning_fn(handler):
        return "in"
    return None


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and module.groups == module.in_channels


def _gate_sites(dg: tp.DependencyGraph, tp_group, names: dict[nn.Module, str]) -> list[GateSite]:
    """Gate every producer's output with the group's gate, except a conv / linear whose only consumer is a
    normalisation layer of the same group: that one is gated after the norm (so the gate also removes the
    norm's shift ``beta`` and the masked model equals the compacted one)."""
    out_modules = [
        it.dep.target.module for it in tp_group.items
        if isinstance(it.dep.target.module, nn.Module) and _kind(dg, it.dep.handler) == "out"
        and isinstance(it.dep.target.module, UNIT_TYPES + NORM_TYPES)
    ]
    in_group = set(out_modules)
    sites: list[GateSite] = []
    seen: set[nn.Module] = set()
    for m in out_modules:
        if m in seen:
            continue
        seen.add(m)
        if isinstance(m, UNIT_TYPES):
            outs = dg.module2node[m].outputs
            if len(outs) == 1 and isinstance(outs[0].module, NORM_TYPES) and outs[0].module in in_group:
                continue
        sites.append(GateSite(names[m], channel_dim(m)))
    return sites


def _convert_group(dg: tp.DependencyGraph, tp_group, names: dict[nn.Module, str]) -> ChannelGroup | None:
    root = tp_group[0].dep.target.module
    members: dict[tuple[str, str], GroupMember] = {}
    for it in tp_group.items:
        module = it.dep.target.module
        kind = _kind(dg, it.dep.handler)
        if kind is None or not isinstance(module, nn.Module) or module not in names:
            continue  # functional ops (add, relu, reshape) and unwrapped parameters carry no weights
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        if kind == "in" and _is_depthwise(module):
            continue  # a depthwise conv's inputs are its outputs: covered by its "out" member
        key = (names[module], kind)
        if key in members:
            continue
        members[key] = GroupMember(
            name=names[module], kind=kind, layer_type=type(module).__name__,
            idxs=tuple(int(i) for i in it.idxs), root_idxs=tuple(int(i) for i in it.root_idxs),
        )
    num_units = len(tp_group[0].idxs)
    if num_units < 2:
        return None
    return ChannelGroup(
        id=names[root], members=list(members.values()), num_units=num_units,
        gates=_gate_sites(dg, tp_group, names),
    )


def build_groups(
    model: nn.Module,
    example_input: torch.Tensor,
    ignored_layers: Sequence[nn.Module] | None = None,
    root_types: Iterable[type[nn.Module]] = UNIT_TYPES,
    dg: tp.DependencyGraph | None = None,
) -> list[ChannelGroup]:
    """All dependency groups of ``model`` (classifier outputs excluded).

    ``ignored_layers`` defaults to ``[find_classifier(model)]``. Groups with fewer than two units are
    dropped (a layer can never lose its last channel).
    """
    if ignored_layers is None:
        ignored_layers = [find_classifier(model)]
    dg = dg if dg is not None else build_dependency_graph(model, example_input)
    names = {m: n for n, m in model.named_modules()}
    groups: list[ChannelGroup] = []
    for g in dg.get_all_groups(ignored_layers=list(ignored_layers), root_module_types=list(root_types)):
        converted = _convert_group(dg, g, names)
        if converted is not None:
            groups.append(converted)
    if not groups:
        raise ValueError("no prunable structured groups found (only the classifier?)")
    logger.debug("found %d groups, %d units", len(groups), sum(g.num_units for g in groups))
    return groups


def unit_index(member: GroupMember) -> tuple[torch.Tensor, torch.Tensor]:
    """``(idxs, root_idxs)`` of a member as long tensors."""
    return torch.tensor(member.idxs, dtype=torch.long), torch.tensor(member.root_idxs, dtype=torch.long)


def pruned_member_indices(member: GroupMember, keep: torch.Tensor) -> torch.Tensor:
    """The member's own indices removed when the group keeps the units ``keep`` (bool, per unit)."""
    idxs, roots = unit_index(member)
    return idxs[~keep.cpu()[roots]]


def param_masks(
    model: nn.Module, groups: Sequence[ChannelGroup], group_masks: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Structured group masks as prunelab's per-parameter bool masks (True = kept).

    For every conv / linear weight touched by a group: the rows of pruned units (``out`` members) and the
    input columns they feed (``in`` members) are False; biases and norm affine parameters of pruned
    channels are False too. Parameters not touched are left out.
    """
    masks: dict[str, torch.Tensor] = {}
    for g in groups:
        keep = group_masks.get(g.id)
        if keep is None:
            continue
        for mem in g.members:
            module = model.get_submodule(mem.name)
            drop = pruned_member_indices(mem, keep)
            for pname, p in module.named_parameters(recurse=False):
                full = f"{mem.name}.{pname}" if mem.name else pname
                dim = 0 if mem.kind == "out" else 1
                if p.dim() <= dim or (mem.kind == "in" and pname != "weight"):
                    continue
                m = masks.setdefault(full, torch.ones_like(p, dtype=torch.bool))
                m.index_fill_(dim, drop.to(p.device), False)
    return masks


def removable_group_masks(
    groups: Sequence[ChannelGroup],
    layer_keep: dict[str, torch.Tensor],
    counts: Callable[[GroupMember], bool] = lambda member: True,
) -> dict[str, torch.Tensor]:
    """Group masks (True = kept) for :func:`~prunelab.pruning.units.compact.compact` from per-layer unit
    masks of a method that masks layers separately (BMRS noise, DLLP gates).

    ``layer_keep``: ``{producer layer name: bool per output unit of that layer}``. A unit of a group is
    removable iff every producer member that ``counts`` has a mask and prunes it there -- then the channel is
    exactly zero wherever it is read (residual coupling included) and removing it leaves the function
    unchanged. A group with a counted producer without a mask, or with no counted producer, loses nothing; a
    group never loses all its units (the first stays, zero)."""
    out: dict[str, torch.Tensor] = {}
    for g in groups:
        removable = torch.ones(g.num_units, dtype=torch.bool)
        counted = False
        for mem in g.producers():
            if not counts(mem):
                continue
            keep = layer_keep.get(mem.name)
            if keep is None:
                removable[:] = False
                break
            counted = True
            pruned_here = torch.zeros(g.num_units, dtype=torch.bool)
            idxs = torch.as_tensor(mem.idxs, dtype=torch.long)
            roots = torch.as_tensor(mem.root_idxs, dtype=torch.long)
            pruned_here[roots] = ~keep.cpu().bool()[idxs]
            removable &= pruned_here
        if counted and removable.any():
            if removable.all():
                removable[0] = False
            out[g.id] = ~removable
    return out


def _block_of(model: nn.Module, name: str) -> str:
    """The residual block a layer belongs to: its nearest ancestor that is an element of an ``nn.Sequential``
    (a stage's block; a downsample branch or a squeeze-excitation module inside the block is not one), ``""``
    when there is none (the stem, a plain layer)."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        ancestor, parent = ".".join(parts[:i]), ".".join(parts[: i - 1])
        if not isinstance(model.get_submodule(ancestor), nn.Sequential) and isinstance(
            model.get_submodule(parent), nn.Sequential
        ):
            return ancestor
    return ""


def _is_residual(model: nn.Module, group: ChannelGroup) -> bool:
    """Two or more conv / linear layers (not depthwise) write the group's channels: they are summed."""
    writers = [model.get_submodule(m.name) for m in group.producers()]
    return sum(isinstance(w, UNIT_TYPES) and not _is_depthwise(w) for w in writers) >= 2


def block_output_gates(
    model: nn.Module, groups: Sequence[ChannelGroup], example_input: torch.Tensor
) -> list[ChannelGroup]:
    """Residual channels gated as Molchanov et al.'s code gates ResNets (``method.residual_gates=block_output``).

    Their ``models/resnet.py`` multiplies every block's output, after the addition and the ReLU, by the gate of
    its stage (``gate_skip64`` ... ``gate_skip512``, one module shared by the blocks of a stage), keeps per-BN
    gates inside the blocks, and has no gate on the stem. prunelab's default (``producers``) gates each BN that
    writes a residual channel, before the addition, with the group's shared gate, and treats the stem like any
    other layer. A masked network is the same either way (a channel zeroed after every block of its stage is
    zero wherever it is read, as when every writer is zeroed); what differs is where ``dL/dz`` is read, hence
    the Taylor scores, and which groups exist:

    - every residual group (two or more conv/linear writers, summed) is gated at the output of each block
      holding one of its writers, instead of at the writers;
    - every group with a writer outside any block is removed, so never pruned: the stem, and in basic-block
      ResNets whose first stage has no projection shortcut, that stage too (the reference gates it, but its
      channels still reach the first block's convolution from the stem, which a compacted network cannot
      express);
    - the other groups (inside the blocks) keep their gates.

    A block is the nearest ancestor that is an element of an ``nn.Sequential`` stage (torchvision, timm and
    prunelab ResNets). ``ValueError`` for a model without residual groups, or where a block's output does not
    carry the group's channels in the group's order along dim 1 (only ResNet-style blocks are supported)."""
    blocks: dict[str, list[str]] = {}
    out: list[ChannelGroup] = []
    for g in groups:
        owners = [_block_of(model, m.name) for m in g.producers()]
        if "" in owners:
            continue  # the stem (and whatever it is coupled with) is never pruned
        if not _is_residual(model, g):
            out.append(g)
            continue
        if any(m.idxs != m.root_idxs for m in g.producers()):
            raise ValueError(f"method.residual_gates=block_output: group {g.id!r} is not channel-aligned across its "
                             "blocks (only ResNet-style blocks are supported; use method.residual_gates=producers)")
        names = list(dict.fromkeys(owners))
        blocks[g.id] = names
        out.append(ChannelGroup(id=g.id, members=g.members, num_units=g.num_units,
                                gates=[GateSite(n, 1) for n in names]))
    if not blocks:
        raise ValueError("method.residual_gates=block_output: the model has no residual-coupled channel group "
                         "(only ResNet-style models have; use method.residual_gates=producers)")
    channels: dict[str, int] = {}

    def record(name: str):
        def hook(module, inputs, output):
            channels[name] = output.shape[1] if isinstance(output, torch.Tensor) and output.dim() > 1 else -1
        return hook

    gated = {n for ns in blocks.values() for n in ns}
    handles = [model.get_submodule(n).register_forward_hook(record(n)) for n in gated]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    for g in out:
        for n in blocks.get(g.id, ()):
            if channels.get(n) != g.num_units:
                raise ValueError(f"method.residual_gates=block_output: module {n!r} (the block of a writer of group "
                                 f"{g.id!r}) outputs {channels.get(n)} channels, not the group's {g.num_units} (only "
                                 "ResNet-style blocks are supported; use method.residual_gates=producers)")
    return out
