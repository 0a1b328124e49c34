"""Any timm model by name: ``model=timm model.arch=resnet26d``. Random initialisation (timm's own), no
pretrained weights are downloaded (the pipeline pretrains)."""

from __future__ import annotations

from torch import nn

from prunelab.models.registry import register_model


@register_model(name="timm")
def timm_model(input_shape, num_classes, arch: str = "resnet18", **kwargs) -> nn.Module:
    import timm

    if arch not in timm.list_models():
        raise ValueError(f"model.arch={arch!r} is not a timm model; see timm.list_models() for allowed values")
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=input_shape[0], **kwargs)
