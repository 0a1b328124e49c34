"""Gates: one multiplicative scalar per unit, ``z = 1``, through which importance is read and masks applied.

Molchanov et al. (CVPR 2019, Sec. 3.3) attach a gate ``z_m`` to every unit's output and score the unit by
the Taylor expansion of the loss in ``z_m`` around 1. For a conv followed by BatchNorm the gate sits *after*
the BN, so ``z * (gamma * xhat + beta)`` and ``z dL/dz = gamma dL/dgamma + beta dL/dbeta`` (their Eq. 7 /
"Taylor FO on BN").

Implementation: forward hooks (:class:`~prunelab.pruning.units.sites.SiteHook`; the model class is untouched, ``state_dict`` unchanged). A group's gate
vector ``z`` (a leaf tensor, ``requires_grad=True``, not a model parameter so no optimiser moves it) times
the group's bool mask multiplies the output of every gate site of the group (:class:`GateSite`). For a
residual-coupled group, every member producing the coupled channels (each block's last BN, the downsample
BN, the stem BN) is multiplied by the SAME ``z``: autograd then sums the per-site contributions, so
``dL/dz_u`` is the derivative of the loss w.r.t. a common scale of every copy of unit ``u`` -- the quantity
whose Taylor expansion predicts removing the unit everywhere at once.

Masks: ``z * mask`` with a False entry zeroes the unit's output after BN (bias ``beta`` included) at every
site, so the downstream layers see exactly zero in that channel -- the same function as the compacted model
that does not have the channel at all (see :func:`prunelab.pruning.units.compact.compact`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from prunelab.pruning.units.groups import ChannelGroup
from prunelab.pruning.units.sites import attach, broadcast_view, strip_site_hooks


class Gates:
    """Gate vectors and masks for a list of groups, installed as forward hooks on ``model``."""

    def __init__(self, model: nn.Module, groups: Sequence[ChannelGroup]):
        self.model = model
        self.groups = {g.id: g for g in groups}
        device = next(model.parameters()).device
        self.z: dict[str, torch.Tensor] = {
            g.id: torch.ones(g.num_units, device=device, requires_grad=True) for g in groups
        }
        self.mask: dict[str, torch.Tensor] = {
            g.id: torch.ones(g.num_units, device=device, dtype=torch.bool) for g in groups
        }
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.install()

    # hooks ------------------------------------------------------------------------------------------------
    def install(self) -> None:
        """(Re)attach the hooks (idempotent)."""
        self.remove()
        for g in self.groups.values():
            for site in g.gates:
                self._handles.append(attach(self.model.get_submodule(site.name), self, (g.id, site.dim)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def multiply(self, key: tuple[str, int], output: torch.Tensor) -> torch.Tensor:
        """The site hook's multiply: ``output * (z * mask)`` of group ``key[0]`` along dim ``key[1]``."""
        gid, dim = key
        return output * broadcast_view(self.effective(gid).to(dtype=output.dtype), output, dim)

    # values -----------------------------------------------------------------------------------------------
    def effective(self, group_id: str) -> torch.Tensor:
        """``z * mask`` of a group (what multiplies the unit outputs)."""
        return self.z[group_id] * self.mask[group_id]

    def set_masks(self, masks: dict[str, torch.Tensor]) -> None:
        for gid, m in masks.items():
            self.mask[gid] = m.to(device=self.mask[gid].device, dtype=torch.bool).clone()

    def to(self, device: torch.device | str) -> Gates:
        """Move gates and masks (e.g. when the trainer moves the model to a GPU)."""
        self.z = {gid: z.detach().to(device).requires_grad_(True) for gid, z in self.z.items()}
        self.mask = {gid: m.to(device) for gid, m in self.mask.items()}
        return self

    def zero_grad(self) -> None:
        for z in self.z.values():
            z.grad = None

    def grads(self) -> dict[str, torch.Tensor | None]:
        return {gid: (None if z.grad is None else z.grad.detach().clone()) for gid, z in self.z.items()}

    def parameters(self) -> list[torch.Tensor]:
        return list(self.z.values())

    @contextlib.contextmanager
    def ablated(self, group_id: str, unit: int) -> Iterator[None]:
        """Temporarily remove one unit (gate set to 0)."""
        z = self.z[group_id]
        with torch.no_grad():
            old = z[unit].item()
            z[unit] = 0.0
        try:
            yield
        finally:
            with torch.no_grad():
                z[unit] = old


def strip_gate_hooks(model: nn.Module) -> int:
    """Remove every multiplier hook from ``model`` (e.g. from a deep copy of a gated model); returns how many."""
    return strip_site_hooks(model)
