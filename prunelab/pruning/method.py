"""Methods that prune while training (the ``method`` config group, next to the unstructured scorers of
:mod:`prunelab.pruning.scorers`).

A :class:`TrainingMethod` turns the model into what it trains (gates, noise variables, particles...) and
returns the :class:`~prunelab.pipeline.hooks.TrainHook` that drives pruning inside the training loop;
``finish`` turns the trained model back into a plain network, physically smaller where units were removed.
``schedule=train_prune`` (and its preset ``iterative_structured``) runs them; methods that can also prune
from scores alone (the structured criteria) implement ``one_shot`` and work with ``schedule=oneshot``.

Adding a method: one file with a ``TrainingMethod`` subclass and one YAML in ``conf/method/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from prunelab.pipeline.hooks import TrainHook


def check_choice(option: str, value: Any, allowed: Sequence[Any]) -> Any:
    """``value`` if it is one of ``allowed``, else a ValueError naming the option and the allowed values."""
    if value not in allowed:
        raise ValueError(f"{option}={value!r}; allowed values: {', '.join(map(str, allowed))}")
    return value


class TrainingMethod:
    name = "base"
    structured: bool = True
    needs_data: bool = True
    # this method prunes with schedule=oneshot (scores -> masks) as well as during training
    supports_one_shot: bool = False

    def attach(self, ctx, model: nn.Module, schedule: Any) -> tuple[nn.Module, TrainHook]:
        """Prepare ``model`` for pruning while training; returns (the module to train, its hook).
        ``schedule`` is the :class:`~prunelab.pipeline.schedules.TrainPrune` object (frequency, k...)."""
        raise NotImplementedError

    def finish(self, ctx, model: nn.Module, hook: TrainHook) -> tuple[nn.Module, dict[str, Any]]:
        """After the pruning stage: (the plain pruned network, a JSON-able record). In the record, ``metrics``
        (a flat dict of numbers) is logged with the stage prefix and ``final`` (a flat dict) is merged into the
        ``final`` block of results.json (e.g. reliability estimates)."""
        raise NotImplementedError

    def target(self) -> tuple[float | None, str]:
        """(target value, its kind) for the ``final`` block of results.json (``sparsity_target``, ``target``)."""
        return None, self.name

    def one_shot(self, ctx, model: nn.Module, batches: list) -> tuple[nn.Module, dict[str, Any]]:
        raise ValueError(f"method={self.name} prunes during training: use schedule=train_prune "
                         "(or one of its presets, e.g. schedule=iterative_structured)")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({vars(self)})"


def train_set_size(dm: Any) -> int:
    """Number of examples in the training split of a prunelab data module (likelihood scales N / B)."""
    if hasattr(dm, "split"):
        return int(len(dm.split("train")[0]))
    train = getattr(dm, "_train", None)
    if train is not None:
        return int(len(train))
    return int(len(dm.train_dataloader().dataset))
