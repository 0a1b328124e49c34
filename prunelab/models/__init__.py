"""Model registry: ``build_model(name, input_shape, num_classes, **kwargs)``.

Architectures register themselves with :func:`register_model` (timm style). Input shape (C, H, W) and the
number of classes always come from the data module, so one YAML per architecture fits every dataset.
"""

from __future__ import annotations

# Importing the modules registers their architectures.
from prunelab.models import lenet as _lenet  # noqa: F401,E402
from prunelab.models import resnet as _resnet  # noqa: F401,E402
from prunelab.models import timm_model as _timm  # noqa: F401,E402
from prunelab.models import vgg as _vgg  # noqa: F401,E402
from prunelab.models.registry import MODELS, build_model, list_models, register_model

__all__ = ["MODELS", "build_model", "list_models", "register_model"]
