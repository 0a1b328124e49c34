"""``MaskSet``: the one object that knows which weights are pruned.

A mask is a boolean tensor per prunable parameter (True = kept), keyed by the parameter's name in the model.
Pruned weights are kept at exactly zero by :meth:`MaskSet.apply` (weights) and :meth:`MaskSet.mask_grads`
(gradients), each a single fused ``torch._foreach_mul_`` over all masked tensors: after every optimiser step
the pruned weights are zero whatever the optimiser's state (momentum, weight decay, Adam moments).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

PRUNABLE_TYPES: dict[str, tuple[type[nn.Module], ...]] = {
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d),
    "linear": (nn.Linear,),
}


def prunable_parameters(
    model: nn.Module,
    include: Iterable[str] = ("conv", "linear"),
    exclude_first: bool = False,
    exclude_last: bool = False,
    exclude: Iterable[str] = (),
) -> list[str]:
    """Names of the weight tensors to prune, in module registration order.

    ``include``: layer kinds (``conv``, ``linear``); ``exclude_first``/``exclude_last``: drop the first/last of
    those layers; ``exclude``: fnmatch patterns on parameter names (e.g. ``"*.downsample.*"``).
    """
    kinds = list(include)
    unknown = [k for k in kinds if k not in PRUNABLE_TYPES]
    if unknown:
        raise ValueError(f"prune.include: unknown layer kind(s) {unknown}; allowed values: {sorted(PRUNABLE_TYPES)}")
    types = tuple(t for k in kinds for t in PRUNABLE_TYPES[k])
    names = [
        f"{mname}.weight" if mname else "weight"
        for mname, m in model.named_modules()
        if isinstance(m, types) and getattr(m, "weight", None) is not None
    ]
    if exclude_first and names:
        names = names[1:]
    if exclude_last and names:
        names = names[:-1]
    patterns = list(exclude)
    names = [n for n in names if not any(fnmatch.fnmatch(n, p) for p in patterns)]
    if not names:
        raise ValueError("no prunable tensors left: check prune.include / prune.exclude")
    return names


class MaskSet(Mapping[str, torch.Tensor]):
    """Boolean masks per parameter name. Behaves as a read-only mapping name -> mask."""

    def __init__(self, masks: Mapping[str, torch.Tensor]):
        self._masks: dict[str, torch.Tensor] = {k: v.detach().to(torch.bool) for k, v in masks.items()}
        self._bound: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self._first = next(iter(self._masks), "")
        self._bound_model: int | None = None

    # construction -------------------------------------------------------------------------------------
    @classmethod
    def dense(cls, model: nn.Module, names: Iterable[str]) -> MaskSet:
        return cls({n: torch.ones_like(model.get_parameter(n), dtype=torch.bool) for n in names})

    @classmethod
    def from_model(cls, model: nn.Module, **selection) -> MaskSet:
        return cls.dense(model, prunable_parameters(model, **selection))

    # mapping ------------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def copy(self) -> MaskSet:
        return MaskSet({k: v.clone() for k, v in self._masks.items()})

    def to(self, device: torch.device | str) -> MaskSet:
        self._masks = {k: v.to(device) for k, v in self._masks.items()}
        self._bound = None
        return self

    # enforcement --------------------------------------------------------------------------------------
    def _bind(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The masked parameters of ``model`` and the masks cast to their device and dtype, looked up once
        per model (parameter objects survive ``.to()`` and ``load_state_dict``), not on every step."""
        bound = self._bound
        if bound is not None and self._bound_model == id(model):
            params, masks = bound
            # one lookup guards against a new model object that reuses a freed model's id
            if (params[0] is model.get_parameter(self._first) and params[0].device == masks[0].device
                    and params[0].dtype == masks[0].dtype):
                return bound
        params = [model.get_parameter(n) for n in self._masks]
        masks = [m.to(device=p.device, dtype=p.dtype) for m, p in zip(self._masks.values(), params)]
        self._bound, self._bound_model = (params, masks), id(model)
        return self._bound

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Zero the pruned weights (one fused multiply over all masked tensors)."""
        params, masks = self._bind(model)
        torch._foreach_mul_([p.data for p in params], masks)

    @torch.no_grad()
    def mask_grads(self, model: nn.Module) -> None:
        """Zero the gradients of pruned weights, so optimiser state never accumulates for them."""
        params, masks = self._bind(model)
        pairs = [(p.grad, m) for p, m in zip(params, masks) if p.grad is not None]
        if pairs:
            torch._foreach_mul_([g for g, _ in pairs], [m for _, m in pairs])

    # statistics ---------------------------------------------------------------------------------------
    def numel(self) -> int:
        return sum(m.numel() for m in self._masks.values())

    def remaining(self) -> int:
        return int(sum(int(m.sum()) for m in self._masks.values()))

    def sparsity(self) -> float:
        total = self.numel()
        return 1.0 - self.remaining() / total if total else 0.0

    def compression(self) -> float:
        rem = self.remaining()
        return self.numel() / rem if rem else math.inf

    def layer_stats(self) -> list[dict]:
        return [
            {"name": n, "shape": list(m.shape), "numel": m.numel(), "remaining": int(m.sum())}
            for n, m in self._masks.items()
        ]

    # persistence --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self._masks.items()}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> MaskSet:
        return cls(state)

    def digest(self) -> int:
        """A 60-bit content hash (names and bits), to compare masks across processes cheaply."""
        import hashlib

        h = hashlib.sha256()
        for k in sorted(self._masks):
            h.update(k.encode())
            h.update(self._masks[k].detach().cpu().contiguous().numpy().tobytes())
        return int(h.hexdigest()[:15], 16)

    def equal(self, other: Mapping[str, torch.Tensor]) -> bool:
        return set(self) == set(other) and all(torch.equal(self[k].cpu(), other[k].cpu()) for k in self)


def sparsity_from_options(sparsity: float | None, compression: float | None) -> float:
    """Validate ``prune.sparsity`` / ``prune.compression`` (exactly one) and return the sparsity."""
    if sparsity is not None and compression is not None:
        raise ValueError(
            f"set prune.sparsity or prune.compression, not both (got sparsity={sparsity}, compression={compression})"
        )
    if sparsity is None and compression is None:
        raise ValueError("set one of prune.sparsity (0 <= s < 1) or prune.compression (>= 1)")
    if compression is not None:
        if not (isinstance(compression, (int, float)) and compression >= 1 and math.isfinite(compression)):
            raise ValueError(f"prune.compression must be a finite number >= 1 (total / remaining), got {compression}")
        return 1.0 - 1.0 / float(compression)
    if not (isinstance(sparsity, (int, float)) and 0.0 <= sparsity < 1.0):
        raise ValueError(f"prune.sparsity must be in [0, 1) (fraction of prunable weights removed), got {sparsity}")
    return float(sparsity)
