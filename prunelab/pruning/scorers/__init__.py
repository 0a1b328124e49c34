"""Scorers: one module per unstructured pruning criterion (``Scorer`` subclasses). A new method is one file
here plus one YAML in ``conf/method/`` whose ``_target_`` names the class; the pipeline instantiates it from
the YAML (no registry), and the option it was chosen by (``method=<yaml name>``) is its name in results."""

from __future__ import annotations

from prunelab.pruning.scorers.base import Scorer

__all__ = ["Scorer"]
