"""Model registry: ``build_model(name, input_shape, num_classes, **kwargs)``.

Architectures register themselves with :func:`register_model` (timm style). Input shape (C, H, W) and the
number of classes always come from the data module, so one YAML per architecture fits every dataset.

Every module of this package is imported here (:func:`load_all`, as the scorers are discovered), so a new
architecture is one file in ``prunelab/models/`` plus one YAML in ``conf/model/``; nothing to edit here.
"""

from __future__ import annotations

import importlib
import pkgutil

from prunelab.models.registry import MODELS, build_model, list_models, register_model

__all__ = ["MODELS", "build_model", "list_models", "load_all", "register_model"]


def load_all() -> list[str]:
    """Import every module of this package (each registers its architectures); return the registered names.
    timm is imported inside its factory, so this stays cheap."""
    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "registry":
            importlib.import_module(f"{__name__}.{mod.name}")
    return MODELS.names()


load_all()
