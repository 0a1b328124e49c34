"""Sites: where a per-unit multiplier attaches, and the one forward-hook mechanism that applies it.

A :class:`LayerSite` is one unit-producing layer (a conv or linear layer other than the classifier) with its
units: the normalisation layer right after it (same channels; a multiplier placed after the layer goes after
it, so the norm's shift is multiplied too) and the activation module that follows. A multiplier attaches at
one of three *positions* of a site: ``"layer"`` (the layer's output), ``"norm"`` (after the normalisation)
or ``"activation"`` (after the non-linearity). The three multiplier kinds of prunelab use these sites:

- the Taylor gate (:class:`~prunelab.pruning.units.gates.Gates`): one vector per dependency group, shared by
  the group's sites (``ChannelGroup.gates``: its layers' norm-or-layer positions);
- BMRS multiplicative noise (:class:`~prunelab.pruning.bayes.bmrs.LogNormalNoise`): one per site, at the
  norm (``placement=batchnorm``), the activation (``activation``) or the layer output (``transformer``);
- DLLP particle gates (:class:`~prunelab.pruning.bayes.dllp.DLLPModel`): one ``(M, units)`` block per site,
  at its norm-or-layer position.

Every one of them is applied by a :class:`SiteHook` (``output -> multiplier.multiply(key, output)``), so a
copied or compacted model is cleaned of all of them by :func:`strip_site_hooks`.

Which module follows a layer is read from the order the forward pass calls them (:func:`execution_order`)
when an example input is given, and from registration order otherwise; the two differ for a model that
registers its modules in another order than it uses them (``self.act`` defined before ``self.fc``), where only
the first is right.

Which parameters a site's units own (:func:`site_param_masks`) comes from the dependency groups
(:mod:`.groups`): the layer's rows and bias, the norm's affine entries and -- when no other layer produces
the same units (no residual coupling) -- every reader's input columns (after a flatten too).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from prunelab.pruning.units.groups import ChannelGroup, build_groups, find_classifier, pruned_member_indices
from prunelab.pruning.units.layers import ACTIVATION_TYPES, NORM_TYPES, UNIT_TYPES, channel_dim, out_units

POSITIONS = ("layer", "norm", "activation")


@dataclass(frozen=True)
class LayerSite:
    """One unit-producing layer and the modules after it (names in ``model.named_modules()``)."""

    layer: str
    units: int
    dim: int                       # unit axis of the layer's output (-1 linear, 1 conv)
    norm: str | None = None        # normalisation right after the layer, over its channels
    activation: str | None = None  # first activation module after the layer (and its norm)
    activation_shared: bool = False  # that activation module is used at several places of the model

    def position(self, where: str) -> str | None:
        """The module whose output a multiplier at ``where`` multiplies (``None``: the site has no such
        module); ``"norm_or_layer"`` is the norm when there is one, else the layer."""
        if where == "norm_or_layer":
            return self.norm or self.layer
        if where not in POSITIONS:
            raise ValueError(f"site position must be one of {POSITIONS}, got {where!r}")
        return {"layer": self.layer, "norm": self.norm, "activation": self.activation}[where]


def execution_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the leaf modules of ``model`` in the order a forward pass of ``example`` first calls them
    (leaves the pass never calls are left out). The pass runs in eval mode without gradients (no BatchNorm
    statistics change), and the model's train/eval flags are restored."""
    leaves = {m: n for n, m in model.named_modules() if not any(True for _ in m.children())}
    seen: dict[str, None] = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, name=n: seen.setdefault(name)) for m, n in leaves.items()]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.training = t
    return list(seen)


def layer_sites(model: nn.Module, exclude: Iterable[str] = (), skip_classifier: bool = True,
                example: torch.Tensor | None = None) -> list[LayerSite]:
    """Every conv / linear layer of ``model`` except the classifier (:func:`.groups.find_classifier`) and the
    layers whose name matches an fnmatch pattern of ``exclude``, in forward order (:func:`execution_order` of
    ``example``; registration order without one).

    The norm is the next leaf module in that order when it is a normalisation layer over the layer's
    channels; the activation is the first activation module after the layer and before the next conv /
    linear layer."""
    leaves = [(n, m) for n, m in model.named_modules() if not any(True for _ in m.children())]
    if example is not None:
        modules = dict(leaves)
        leaves = [(n, modules[n]) for n in execution_order(model, example)]
    uses: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    classifier = find_classifier(model) if skip_classifier else None
    patterns = list(exclude)
    sites: list[LayerSite] = []
    for i, (name, layer) in enumerate(leaves):
        if not isinstance(layer, UNIT_TYPES) or layer is classifier:
            continue
        if any(fnmatch.fnmatch(name, p) for p in patterns):
            continue
        units = out_units(layer)
        norm = None
        if i + 1 < len(leaves):
            nxt_name, nxt = leaves[i + 1]
            if isinstance(nxt, NORM_TYPES) and getattr(nxt, "num_features", None) == units:
                norm = nxt_name
        act, shared = None, False
        for n2, m2 in leaves[i + 1:]:
            if isinstance(m2, UNIT_TYPES):
                break
            if isinstance(m2, ACTIVATION_TYPES):
                act, shared = n2, uses[id(m2)] > 1
                break
        sites.append(LayerSite(name, units, channel_dim(layer), norm, act, shared))
    return sites


# ---------------------------------------------------------------------------------------------------------
# the one hook mechanism
# ---------------------------------------------------------------------------------------------------------
class Multiplier(Protocol):
    def multiply(self, key: Any, output: torch.Tensor) -> torch.Tensor:
        """``output`` times this multiplier's per-unit factor for ``key`` (a group id, a site...)."""


class SiteHook:
    """Forward hook ``output -> multiplier.multiply(key, output)``. Deep copies of a model copy the hook with
    it (a multiplier that is a submodule of the model is re-bound to the copy's)."""

    def __init__(self, multiplier: Multiplier, key: Any = None):
        self.multiplier, self.key = multiplier, key

    def __call__(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        return self.multiplier.multiply(self.key, output)


def attach(module: nn.Module, multiplier: Multiplier, key: Any = None) -> torch.utils.hooks.RemovableHandle:
    """Multiply ``module``'s output by ``multiplier`` (for ``key``)."""
    return module.register_forward_hook(SiteHook(multiplier, key))


def strip_site_hooks(model: nn.Module, multiplier: Multiplier | None = None) -> int:
    """Remove every :class:`SiteHook` (of ``multiplier`` only, when given) from ``model``; returns how many."""
    n = 0
    for m in model.modules():
        for key in [k for k, h in m._forward_hooks.items()
                    if isinstance(h, SiteHook) and (multiplier is None or h.multiplier is multiplier)]:
            del m._forward_hooks[key]
            n += 1
    return n


def broadcast_view(factor: torch.Tensor, output: torch.Tensor, dim: int) -> torch.Tensor:
    """``factor`` (one value per unit) shaped to broadcast along ``dim`` of ``output``."""
    shape = [1] * output.dim()
    shape[dim % output.dim()] = -1
    return factor.view(shape)


# ---------------------------------------------------------------------------------------------------------
# ownership
# ---------------------------------------------------------------------------------------------------------
def _group_of(groups: Sequence[ChannelGroup], layer: str) -> tuple[ChannelGroup, Any] | None:
    for g in groups:
        for mem in g.producers():
            if mem.name == layer:
                return g, mem
    return None


def _is_coupled(model: nn.Module, group: ChannelGroup, layer: str) -> bool:
    """Another conv / linear layer produces the same units (e.g. a residual addition)."""
    return any(m.name != layer and isinstance(model.get_submodule(m.name), UNIT_TYPES) for m in group.producers())


def site_param_masks(
    model: nn.Module,
    sites: Sequence[LayerSite],
    keep: Mapping[str, torch.Tensor],
    example: torch.Tensor,
    groups: Sequence[ChannelGroup] | None = None,
) -> dict[str, torch.Tensor]:
    """Parameter masks (prunelab's convention: ``{param name: bool}``, True = kept) of the parameters owned by
    the pruned units of each site, ``keep``: ``{site layer name: bool (units,)}``.

    A unit owns its layer's row (and bias entry), its norm's affine entries and, when no other conv / linear
    layer is coupled to it, the input columns of every layer reading it (the dependency group's readers,
    after flattening too). Units coupled to others (residual streams) own no reader columns: pruning them at
    one producer does not remove the channel from the stream."""
    groups = list(groups) if groups is not None else build_groups(model, example)
    params = dict(model.named_parameters())
    masks: dict[str, torch.Tensor] = {}

    def drop(pname: str, dim: int, idx: torch.Tensor) -> None:
        p = params[pname]
        if p.dim() <= dim:
            return
        m = masks.setdefault(pname, torch.ones_like(p, dtype=torch.bool))
        m.index_fill_(dim, idx.to(p.device), False)

    for site in sites:
        k = keep.get(site.layer)
        if k is None:
            continue
        pruned = (~k.cpu().bool()).nonzero().flatten()
        for mod_name in (site.layer, site.norm):
            if mod_name is None:
                continue
            for pname, _ in model.get_submodule(mod_name).named_parameters(recurse=False):
                drop(f"{mod_name}.{pname}", 0, pruned)
        found = _group_of(groups, site.layer)
        if found is None or not len(pruned):
            continue
        group, mem = found
        if _is_coupled(model, group, site.layer):
            continue
        idxs = torch.as_tensor(mem.idxs, dtype=torch.long)
        roots = torch.as_tensor(mem.root_idxs, dtype=torch.long)
        group_keep = torch.ones(group.num_units, dtype=torch.bool)
        group_keep[roots] = k.cpu().bool()[idxs]
        for reader in group.consumers():
            drop(f"{reader.name}.weight", 1, pruned_member_indices(reader, group_keep))
    return masks
