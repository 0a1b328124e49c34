"""ResNets.

- ``resnet18`` / ``resnet34`` / ``resnet50``: torchvision's implementations (module names as in
  torchvision, so checkpoints and dependency tracing behave as users expect). ``stem="cifar"`` replaces the
  7x7/stride-2 stem and the max-pool by a 3x3/stride-1 conv and no pooling (the CIFAR variant used in the
  pruning literature); ``stem="auto"`` picks it for inputs of at most 64 pixels.
- ``resnet20`` / ``resnet56``: He et al.'s CIFAR ResNets (16/32/64 channels, 3 stages), with 1x1-conv
  projection shortcuts (option B) so that every channel dependency is an ordinary conv.

Initialisation: torchvision's (Kaiming-normal fan_out conv, BatchNorm (1, 0), default linear).
"""

from __future__ import annotations

import torchvision
from torch import nn

from prunelab.models.registry import kaiming_init, register_model


def _torchvision_resnet(arch: str, input_shape, num_classes, stem: str = "auto") -> nn.Module:
    if stem not in ("auto", "cifar", "imagenet"):
        raise ValueError(f"model.stem must be one of auto, cifar, imagenet; got {stem!r}")
    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    c, h, w = input_shape
    if stem == "auto":
        stem = "cifar" if max(h, w) <= 64 else "imagenet"
    if stem == "cifar":
        model.conv1 = nn.Conv2d(c, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif c != 3:
        model.conv1 = nn.Conv2d(c, 64, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


@register_model
def resnet18(input_shape, num_classes, stem: str = "auto") -> nn.Module:
    """He et al. 2016 (torchvision's ResNet-18); Connectivity Matters' Tiny-ImageNet network and DLLP's
    CIFAR-10 one (``stem`` above)."""
    return _torchvision_resnet("resnet18", input_shape, num_classes, stem)


@register_model
def resnet34(input_shape, num_classes, stem: str = "auto") -> nn.Module:
    """He et al. 2016 (torchvision's ResNet-34)."""
    return _torchvision_resnet("resnet34", input_shape, num_classes, stem)


@register_model
def resnet50(input_shape, num_classes, stem: str = "auto") -> nn.Module:
    """He et al. 2016 (torchvision's ResNet-50, bottleneck blocks): Molchanov et al.'s ImageNet network (Taylor),
    BMRS's, DLLP's and the over-parameterization paper's ResNet-50."""
    return _torchvision_resnet("resnet50", input_shape, num_classes, stem)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, input_shape, num_classes, width: int = 16):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(input_shape[0], width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            blocks = [BasicBlock(cin if j == 0 else cout, cout, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        kaiming_init(self)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


@register_model
def resnet20(input_shape, num_classes, width: int = 16) -> nn.Module:
    """He et al. 2016, Sec. 4.2: the CIFAR ResNet-20 (3 stages of 3 basic blocks, 16/32/64 channels), with
    projection shortcuts (option B)."""
    return CifarResNet(20, input_shape, num_classes, width)


@register_model
def resnet56(input_shape, num_classes, width: int = 16) -> nn.Module:
    """He et al. 2016, Sec. 4.2: the CIFAR ResNet-56 (3 stages of 9 basic blocks), with projection shortcuts
    (option B): the over-parameterization paper's (Qian et al.) and DLLP's (Wang et al.) CIFAR-10 network."""
    return CifarResNet(56, input_shape, num_classes, width)
