"""The dataset registry: ``DATASETS.get(name)`` returns the data-module class registered under ``name``."""

from __future__ import annotations

from typing import Any

from prunelab.registry import Registry

DATASETS: Registry[Any] = Registry("dataset")
