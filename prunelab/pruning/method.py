"""Methods that prune while training (the ``method`` config group, next to the unstructured scorers of
:mod:`prunelab.pruning.scorers`).

A :class:`TrainingMethod` turns the model into what it trains (gates, noise variables, particles...) and
returns the :class:`~prunelab.training.hooks.TrainHook` that drives pruning inside the training loop;
``finish`` turns the trained model back into a plain network, physically smaller where units were removed.
``schedule=train_prune`` (and its preset ``iterative_structured``) runs them; methods that can also prune
from scores alone (the structured criteria) implement ``one_shot`` and work with ``schedule=oneshot``.

Adding a method: one file with a ``TrainingMethod`` subclass and one YAML in ``conf/method/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from prunelab.pruning.masks import MaskSet
from prunelab.training.hooks import TrainHook

#: which target option a method reads: ``weights`` (``prune.sparsity`` / ``prune.compression``: fraction of
#: the prunable weights), ``method`` (its own ``method.*`` options: structured ``amount`` / ``target_kind``),
#: ``units`` (``method.sparsity``, by default ``prune.sparsity``: a fraction of units), ``none`` (threshold-free)
PRUNE_TARGETS = ("weights", "method", "units", "none")


def check_choice(option: str, value: Any, allowed: Sequence[Any]) -> Any:
    """``value`` if it is one of ``allowed``, else a ValueError naming the option and the allowed values."""
    if value not in allowed:
        raise ValueError(f"{option}={value!r}; allowed values: {', '.join(map(str, allowed))}")
    return value


class Finished(NamedTuple):
    """What a training-time method hands to fine-tuning: the plain pruned network (compacted where units were
    removed), a :class:`MaskSet` over its parameters for pruned units that could not be removed physically
    (``None`` when there are none; fine-tuning enforces it like unstructured masks), and a JSON-able record."""

    model: nn.Module
    masks: MaskSet | None
    record: dict[str, Any]


class TrainingMethod:
    name = "base"
    structured: bool = True
    needs_data: bool = True
    # this method prunes with schedule=oneshot (scores -> masks) as well as during training
    supports_one_shot: bool = False
    # which target option it reads (PRUNE_TARGETS) and, for the error message, the option that sets it
    prune_target: str = "method"
    target_option: str = "method.amount"

    def attach(self, ctx, model: nn.Module, schedule: Any) -> tuple[nn.Module, TrainHook]:
        """Prepare ``model`` for pruning while training; returns (the module to train, its hook).
        ``schedule`` is the :class:`~prunelab.pipeline.schedules.TrainPrune` object (frequency, k...)."""
        raise NotImplementedError

    def finish(self, ctx, model: nn.Module, hook: TrainHook) -> Finished:
        """After the pruning stage: the plain pruned network, the masks of units it still holds at zero, and a
        JSON-able record (:class:`Finished`). In the record, ``metrics``
        (a flat dict of numbers) is logged with the stage prefix and ``final`` (a flat dict) is merged into the
        ``final`` block of results.json (e.g. reliability estimates)."""
        raise NotImplementedError

    def target(self) -> tuple[float | None, str]:
        """(target value, its kind) for the ``final`` block of results.json (``sparsity_target``, ``target``)."""
        return None, self.name

    def one_shot(self, ctx, model: nn.Module, batches: list) -> Finished:
        raise ValueError(f"method={self.name} prunes during training: use schedule=train_prune "
                         "(or one of its presets, e.g. schedule=iterative_structured)")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({vars(self)})"


def check_target_options(method: Any, prune: Any) -> None:
    """A run that explicitly sets ``prune.sparsity`` or ``prune.compression`` for a method that does not read
    them fails here, naming the option and the method's own target option. Explicitly set: not null (the
    default of both is null; 0.9 applies when neither is set and the method reads them)."""
    target = getattr(method, "prune_target", "weights")
    if target in ("weights", "units"):
        return
    for option in ("sparsity", "compression"):
        if prune.get(option) is not None:
            own = getattr(method, "target_option", None)
            hint = (f"its target is {own}" if own else "it is threshold-free (no target option)")
            raise ValueError(f"prune.{option}={prune.get(option)} is ignored by method={method.name}: {hint}; "
                             f"unset prune.{option} (allowed values for this method: null)")


def example_batch(ctx: Any, model: nn.Module, n: int = 2) -> torch.Tensor | None:
    """A zero batch of the data's input shape on the model's device (what traces a model's forward order);
    None when the context does not know the input shape."""
    shape = getattr(ctx, "input_shape", None)
    return None if shape is None else torch.zeros(n, *shape, device=next(model.parameters()).device)


def train_set_size(dm: Any) -> int:
    """Number of examples in the training split of a prunelab data module (likelihood scales N / B)."""
    if hasattr(dm, "split"):
        return int(len(dm.split("train")[0]))
    train = getattr(dm, "_train", None)
    if train is not None:
        return int(len(train))
    return int(len(dm.train_dataloader().dataset))
