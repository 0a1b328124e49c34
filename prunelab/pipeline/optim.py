"""Optimiser and learning-rate schedule from the ``optimizer`` / ``scheduler`` config nodes."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from prunelab.config import OPTIMIZERS, SCHEDULERS


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    name = cfg.get("name", "sgd")
    lr, wd = float(cfg.get("lr", 0.1)), float(cfg.get("weight_decay", 0.0))
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=float(cfg.get("momentum", 0.0)), weight_decay=wd,
            nesterov=bool(cfg.get("nesterov", False)), foreach=True,
        )
    if name in ("adam", "adamw"):
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        return cls(params, lr=lr, weight_decay=wd, betas=tuple(cfg.get("betas", (0.9, 0.999))), foreach=True)
    raise ValueError(f"optimizer.name={name!r}; allowed values: {', '.join(OPTIMIZERS)}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any], total_steps: int):
    """A per-step LambdaLR: ``cosine`` (to 0 over the stage), ``step`` (x gamma at the given fractions of
    the stage), ``constant``; optional linear warm-up over ``warmup_epochs`` (converted to steps)."""
    name = cfg.get("name", "cosine")
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler.name={name!r}; allowed values: {', '.join(SCHEDULERS)}")
    total = max(1, int(total_steps))
    warm = int(cfg.get("warmup_steps", 0))
    milestones = [float(m) for m in cfg.get("milestones", (0.5, 0.75))]
    gamma = float(cfg.get("gamma", 0.1))

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        t = min(1.0, step / total)
        if name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * t))
        if name == "step":
            return gamma ** sum(t >= m for m in milestones)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
