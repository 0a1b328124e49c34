"""Any torchvision classification model by name: ``model=torchvision model.arch=resnet18``, randomly
initialised (torchvision's own init) or with torchvision's pretrained weights through its weights enums:
``model.weights_name=DEFAULT`` (or a member of the architecture's enum: ``IMAGENET1K_V1``, ``IMAGENET1K_V2``,
...; ``torchvision.models.get_model_weights(arch)`` lists them). ``model.weights`` stays for a local state-dict
file that matches the network exactly.

The weights are loaded by torchvision (``torchvision.models.get_model(arch, weights=...)``), for the
checkpoint's own number of classes and 3 input channels, then adapted to the data as timm adapts its
checkpoints: when ``num_classes`` differs from the checkpoint's, the final classifier (the last ``nn.Linear``,
or the last 1x1 ``nn.Conv2d`` as in SqueezeNet, with the checkpoint's number of outputs) is replaced by a new
layer with PyTorch's default initialisation; with another number of input channels the first convolution
is replaced and its pretrained weights adapted by ``timm.models.adapt_input_conv`` (summed over the RGB filters
for 1 channel, repeated and rescaled for more). Every other weight is the checkpoint's.

Offline, the weights file must already be in torch hub's cache, ``$TORCH_HOME/hub/checkpoints/<file name of
the weights' URL>`` (``torch.hub.get_dir()``); otherwise a FileNotFoundError names that path.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from prunelab.models.registry import register_model


def _weights(arch: str, weights_name: str):
    from torchvision import models as tvm

    enum = tvm.get_model_weights(arch)
    allowed = list(enum.__members__)
    if weights_name not in allowed:
        raise ValueError(f"model.weights_name={weights_name!r} for model.arch={arch}; allowed values: "
                         f"{', '.join(allowed)}")
    return enum[weights_name]


def cache_file(weights) -> Path:
    """The file torchvision reads (and downloads into) for ``weights``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def replace_head(model: nn.Module, old_classes: int, num_classes: int) -> str:
    """Replace the final classifier (the last Linear / 1x1 Conv2d with ``old_classes`` outputs) by a freshly
    initialised one with ``num_classes`` outputs; returns its name."""
    head = None
    for name, m in model.named_modules():
        if (isinstance(m, nn.Linear) and m.out_features == old_classes) or (
                isinstance(m, nn.Conv2d) and m.out_channels == old_classes and m.kernel_size == (1, 1)):
            head = name, m
    if head is None:
        raise ValueError(f"no classifier with {old_classes} outputs found to replace")
    name, m = head
    if isinstance(m, nn.Linear):
        new = nn.Linear(m.in_features, num_classes, bias=m.bias is not None)
    else:
        new = nn.Conv2d(m.in_channels, num_classes, 1, bias=m.bias is not None)
    _replace(model, name, new)
    return name


def adapt_first_conv(model: nn.Module, in_chans: int, pretrained: bool) -> None:
    """Give the first Conv2d ``in_chans`` input channels; pretrained weights adapted as timm does."""
    name, conv = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), (None, None))
    if conv is None or conv.in_channels == in_chans:
        return
    if conv.groups != 1:
        raise ValueError(f"cannot adapt the grouped first convolution {name} to {in_chans} input channels")
    new = nn.Conv2d(in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode)
    if pretrained:
        from timm.models import adapt_input_conv

        with torch.no_grad():
            new.weight.copy_(adapt_input_conv(in_chans, conv.weight.detach()))
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
    _replace(model, name, new)


@register_model(name="torchvision")
def torchvision_model(input_shape, num_classes, arch: str = "resnet18", weights_name: str | None = None,
                      **kwargs) -> nn.Module:
    """``torchvision.models.get_model(arch, ...)`` for ``input_shape`` (C, H, W) and ``num_classes``; see the
    module docstring for ``weights_name``. Other options go to the architecture (e.g. ``+model.dropout=0.2``)."""
    from torchvision import models as tvm

    allowed = tvm.list_models(module=tvm)  # the classification models
    if arch not in allowed:
        raise ValueError(f"model.arch={arch!r} is not a torchvision classification model; allowed values: "
                         f"{', '.join(allowed)}")
    in_chans = int(input_shape[0])
    if not weights_name:
        model = tvm.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
        adapt_first_conv(model, in_chans, pretrained=False)
        return model
    weights = _weights(arch, str(weights_name))
    try:
        model = tvm.get_model(arch, weights=weights, **kwargs)
    except OSError as e:  # not cached and no network (urllib's URLError)
        raise FileNotFoundError(
            f"model=torchvision model.arch={arch} model.weights_name={weights_name}: the weights "
            f"({weights}) are not available ({str(e).splitlines()[0]}). torchvision reads them from "
            f"{cache_file(weights)} (TORCH_HOME moves the cache) and downloads {weights.url} there when it can: "
            "download that file on a machine with internet and copy it to that path") from e
    old_classes = len(weights.meta["categories"])
    if num_classes != old_classes:
        replace_head(model, old_classes, num_classes)
    adapt_first_conv(model, in_chans, pretrained=True)
    return model
