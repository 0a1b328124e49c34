"""Scorers: one module per pruning criterion. Each registers itself with ``@register_scorer``; every
module of this package is imported on first use, so a new method is one file here plus one YAML in
``conf/method/``."""

from __future__ import annotations

import importlib
import pkgutil

from prunelab.pruning.scorers.base import SCORERS, Scorer, register_scorer

__all__ = ["SCORERS", "Scorer", "register_scorer", "load_all"]


def load_all() -> list[str]:
    """Import every scorer module of this package (registers them) and return the registered names."""
    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "base":
            importlib.import_module(f"{__name__}.{mod.name}")
    return SCORERS.names()
