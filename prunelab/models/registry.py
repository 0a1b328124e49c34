"""The model registry and the checked factory used by the pipeline and the configs."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from prunelab.registry import Registry

MODELS: Registry[nn.Module] = Registry("model")


def register_model(fn: Callable[..., nn.Module] | None = None, *, name: str | None = None):
    """Register an architecture factory ``fn(input_shape, num_classes, **kwargs) -> nn.Module``."""
    if fn is None:
        return MODELS.register(name)
    return MODELS.register(name)(fn)


def list_models() -> list[str]:
    return MODELS.names()


def build_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    check_input: bool = True,
    weights: str | None = None,
    **kwargs,
) -> nn.Module:
    """Build ``name`` for inputs of shape ``input_shape`` (C, H, W) and ``num_classes`` outputs.

    Pretrained weights through a library's own API are options of its factory (``model=timm
    model.pretrained=true``, ``model=torchvision model.weights_name=DEFAULT``: ``timm_model.py``,
    ``torchvision_model.py``). ``weights``: a local state-dict file to start from (e.g. torchvision's ``resnet50-19c8e357.pth``, the
    pretrained model the structured-pruning papers prune); with ``pretrain.epochs=0`` the pipeline prunes it
    as it is. The file must exist and match the architecture (checked here, before any training).

    With ``check_input`` a batch of zeros is pushed through the model so that an architecture that does not
    fit the data (e.g. LeNet-5 on 8x8 digits) fails here, before any training, with a message naming both.
    """
    factory = MODELS.get(name)
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) != 3:
        raise ValueError(f"model {name!r}: input_shape must be (C, H, W), got {input_shape}")
    try:
        model = factory(input_shape=input_shape, num_classes=int(num_classes), **kwargs)
    except TypeError as e:
        raise TypeError(f"model {name!r}: bad option ({e})") from e
    except ValueError as e:
        if str(e).startswith("model."):  # a bad option value, named by the factory
            raise
        raise ValueError(f"model={name} does not fit the data (input_shape {list(input_shape)}): {e}") from e
    if weights:
        load_weights(model, name, weights)
    if check_input:
        check_model_fits(model, name, input_shape, num_classes)
    return model


def load_weights(model: nn.Module, name: str, path: str) -> None:
    from pathlib import Path

    if not Path(path).is_file():
        raise FileNotFoundError(f"model.weights={path}: no such file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"model.weights={path} does not match model={name}: {str(e).splitlines()[0]}") from e


def check_model_fits(model: nn.Module, name: str, input_shape: tuple[int, ...], num_classes: int) -> None:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape))
    except (RuntimeError, ValueError) as e:
        raise ValueError(
            f"model={name} does not fit the data: input_shape {list(input_shape)} fails in the forward pass "
            f"({str(e).splitlines()[0]}). Choose a model for this input size or another dataset."
        ) from e
    finally:
        model.train(was_training)
    if out.shape != (2, num_classes):
        raise ValueError(f"model={name} returns shape {tuple(out.shape)}, expected (batch, {num_classes})")


def kaiming_init(model: nn.Module) -> nn.Module:
    """Initialisation used by the CNNs of the registry (as in torchvision's ResNets and the pruning
    literature's VGG): conv weights Kaiming-normal (fan_out, ReLU gain), BatchNorm weight 1 and bias 0,
    linear layers PyTorch's default (Kaiming-uniform with a = sqrt(5), bias uniform in +-1/sqrt(fan_in))."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model
