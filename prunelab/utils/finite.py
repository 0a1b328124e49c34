"""Non-finite numbers (NaN, Inf) are errors, never results: a diverged training stage, a model holding NaN
weights or data holding NaN pixels stops the run with a message that names what to change, before anything
is recorded or cached (a NaN dense model in the cache would be reused by every later run of its key)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


class NonFiniteError(ValueError):
    """A loss, a model or data holds NaN/Inf (the message names the options to change)."""


def nonfinite_counts(tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """``{name: number of NaN/Inf entries}`` of the floating-point tensors that hold any."""
    out = {}
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            bad = int(t.numel() - torch.isfinite(t).sum())
            if bad:
                out[name] = bad
    return out


def describe_counts(counts: Mapping[str, int], limit: int = 3) -> str:
    items = [f"{n} in {name}" for name, n in list(counts.items())[:limit]]
    more = len(counts) - limit
    return ", ".join(items) + (f" and {more} more tensors" if more > 0 else "")


def check_finite_model(model: nn.Module | Mapping[str, torch.Tensor], what: str, advice: str) -> None:
    """Raise :class:`NonFiniteError` when a parameter or buffer of ``model`` (or a state dict) holds NaN/Inf.

    ``what`` says which model (``"pretrain: the trained model"``), ``advice`` what to change."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    counts = nonfinite_counts(state)
    if counts:
        raise NonFiniteError(f"{what} holds non-finite values (NaN/Inf: {describe_counts(counts)}); "
                             f"nothing was recorded or cached. {advice}")


def optimizer_advice(options: str, lr=None) -> str:
    """What to change when training under the optimiser options ``options`` (e.g. ``pretrain.optimizer``)
    diverged."""
    now = f" (now {lr})" if lr is not None else ""
    return (f"Lower {options}.lr{now} or set {options}.clip_grad_norm (e.g. 1.0), and check the data for "
            "NaN/Inf values.")
