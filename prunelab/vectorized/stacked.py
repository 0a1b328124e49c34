"""N copies of one architecture as one model: stacked parameters ``(N, *shape)``, a vmapped forward, stacked
masks, and the way back to N ordinary modules.

Why a copy computes what the separate model computes: ``functional_call(base, params_k, x_k)`` runs the
module's own ``forward`` with copy k's tensors, and ``vmap`` maps it over the leading copy dimension
without mixing copies (each output row depends only on its own parameters and inputs). The loss of the
group is the *sum* of the per-copy mean losses, so the gradient reaching copy k's parameters is exactly
``d loss_k / d theta_k`` (the other terms do not depend on theta_k and the sum's weight is 1.0). What can
differ from a separate run is float rounding: vmap turns ``x @ W.T`` into a batched matmul whose kernel may
accumulate the dot products in another order, so results agree to float tolerance, not bit for bit.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state

_STATEFUL = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd)


def unsupported_model(model: nn.Module) -> str | None:
    """Why ``model`` cannot be vectorised honestly (``None``: it can). Batch statistics and dropout would
    need per-copy buffers updated in place or per-copy random streams matching the separate run's."""
    for name, m in model.named_modules():
        if isinstance(m, _STATEFUL):
            return f"module {name or type(m).__name__} ({type(m).__name__}) has batch statistics or randomness"
    buffers = [n for n, _ in model.named_buffers()]
    if buffers:
        return f"model has buffers ({', '.join(buffers[:3])}); only buffer-free models are vectorised"
    if any(not p.requires_grad for p in model.parameters()):
        return "model has frozen parameters"
    return None


class StackedModel:
    """The parameters of ``models`` stacked along a new leading dimension, trained as leaf tensors.

    ``masks``: one mapping name -> bool mask (or ``None``) per copy; a parameter masked in any copy gets a
    stacked float mask (ones for copies that do not mask it: multiplying by 1.0 is exact)."""

    def __init__(self, models: Sequence[nn.Module], masks: Sequence[Mapping[str, torch.Tensor] | None],
                 device: torch.device):
        if not models:
            raise ValueError("no models to stack")
        self.n = len(models)
        self.names = [n for n, _ in models[0].named_parameters()]
        for m in models[1:]:
            shapes = [(n, tuple(p.shape)) for n, p in m.named_parameters()]
            if shapes != [(n, tuple(p.shape)) for n, p in models[0].named_parameters()]:
                raise ValueError("copies of a vectorised group must share one architecture")
        params, _ = stack_module_state([m.to(device) for m in models])
        self.params: dict[str, torch.Tensor] = {n: params[n].detach().clone().requires_grad_(True)
                                                for n in self.names}
        self.base = copy.deepcopy(models[0]).to("meta")
        masked = sorted({n for ms in masks if ms is not None for n in ms}, key=self.names.index)
        self.masks: dict[str, torch.Tensor] = {}
        for name in masked:
            p = self.params[name]
            rows = [ms[name].to(device=device, dtype=p.dtype) if ms is not None and name in ms
                    else torch.ones(p.shape[1:], device=device, dtype=p.dtype) for ms in masks]
            self.masks[name] = torch.stack(rows)
        self._masked = [self.params[n] for n in self.masks]
        self._mask_list = list(self.masks.values())
        self._forward = torch.vmap(self._one, in_dims=(0, 0))
        self._loss = torch.vmap(F.cross_entropy, in_dims=(0, 0))

    def _one(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.base, params, (x,))

    def parameters(self) -> list[torch.Tensor]:
        return [self.params[n] for n in self.names]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(N, B, ...)`` -> logits ``(N, B, classes)``, copy k through copy k's parameters."""
        return self._forward(self.params, x)

    def losses(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-copy mean cross-entropy ``(N,)`` (``F.cross_entropy`` of each copy, as the pipeline's loss)."""
        return self._loss(logits, y)

    # masks ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero every copy's pruned weights (``MaskSet.apply`` of each copy, one fused multiply)."""
        if self._masked:
            torch._foreach_mul_(self._masked, self._mask_list)

    @torch.no_grad()
    def mask_grads(self) -> None:
        """Zero the gradients of every copy's pruned weights (``MaskSet.mask_grads`` of each copy)."""
        pairs = [(p.grad, m) for p, m in zip(self._masked, self._mask_list) if p.grad is not None]
        if pairs:
            torch._foreach_mul_([g for g, _ in pairs], [m for _, m in pairs])

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> None:
        """``torch.nn.utils.clip_grad_norm_`` (L2, what Lightning's ``clip_gradients(..., "norm")`` calls) of
        each copy separately: its norm over all its parameters, its own scale factor."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return
        norms = torch.stack([torch.linalg.vector_norm(g.reshape(self.n, -1), dim=1) for g in grads])  # (P, N)
        total = torch.linalg.vector_norm(norms, dim=0)  # (N,)
        coef = (float(max_norm) / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.view(-1, *([1] * (g.dim() - 1))))

    # back to N modules ----------------------------------------------------------------------------------
    def state_dict(self, k: int) -> dict[str, torch.Tensor]:
        """Copy k's parameters (detached CPU clones), named as in the original module."""
        return {n: self.params[n][k].detach().cpu().clone() for n in self.names}
