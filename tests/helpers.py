"""Test helpers shared by several test modules (tests is a package: ``from tests.helpers import ...``)."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from types import ModuleType

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@functools.cache
def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` as a module (loaded once per process), for tests of a script's functions."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Interrupt(pl.Callback):
    """Simulates a crash (pre-emption) after ``epoch`` finished epochs of ``stage``; added to a run with
    ``+callbacks.interrupt._target_=tests.helpers.Interrupt +callbacks.interrupt.stage=...``."""

    def __init__(self, stage: str = "finetune", epoch: int = 1):
        self.stage, self.epoch = stage, epoch

    def on_train_epoch_start(self, trainer, module):
        if module.stage == self.stage and trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated pre-emption")


def surplus_units_problem() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The BMRS issue's property-test setting: a 20-64-2 ReLU MLP (far more hidden units than needed) and
    data whose label depends on 2 of the 20 inputs. Returns (model, (x_train, y_train, x_test, y_test))."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(3072, 20, generator=g)
    ys = (xs[:, 0] + xs[:, 1] > 0).long()
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 2))
    return model, (xs[:1024], ys[:1024], xs[1024:], ys[1024:])


def check_pruned_beats_random(model: nn.Module, noise, keep: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                              acc_tol: float = 0.01) -> int:
    """With the noise's mask set to ``keep``: accuracy within ``acc_tol`` of the unpruned network, at least a
    quarter of the 64 units removed, and the loss increase less than half that of removing as many random
    units (mean of 5 draws). Returns the number of units removed."""
    model.eval()

    def evaluate(mask: torch.Tensor) -> tuple[float, float]:
        noise.mask.copy_(mask)
        with torch.no_grad():
            out = model(x)
        return float((out.argmax(1) == y).float().mean()), float(F.cross_entropy(out, y))

    base_acc, base_loss = evaluate(torch.ones(64, dtype=torch.bool))
    k = int((~keep).sum())
    assert base_acc > 0.95 and 16 <= k < 64, (base_acc, k)
    acc, loss = evaluate(keep)
    assert acc >= base_acc - acc_tol, (acc, base_acc)
    gen = torch.Generator().manual_seed(1)
    rand = []
    for _ in range(5):
        rand_keep = torch.ones(64, dtype=torch.bool)
        rand_keep[torch.randperm(64, generator=gen)[:k]] = False
        rand.append(evaluate(rand_keep)[1])
    assert loss - base_loss < 0.5 * (np.mean(rand) - base_loss), (loss, base_loss, rand)
    return k
