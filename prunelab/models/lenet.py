"""LeNet-300-100 (LeCun et al. 1998; Han et al. 2015) and LeNet-5 (Caffe variant, as in the pruning
literature: conv 20@5x5, conv 50@5x5, fc 500).

Initialisation: PyTorch's defaults (Kaiming-uniform, a = sqrt(5)) for every layer, as in the lottery-ticket
and SynFlow code bases.
"""

from __future__ import annotations

import math

from torch import nn

from prunelab.models.registry import register_model


@register_model
def lenet_300_100(input_shape, num_classes, hidden=(300, 100)) -> nn.Module:
    """Fully connected 784-300-100-10 on MNIST (any flattened input size)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@register_model
def mlp(input_shape, num_classes, hidden=(100,)) -> nn.Module:
    """A plain ReLU MLP with configurable hidden widths (BMRS uses 7x100, 1x150, 5x150)."""
    return lenet_300_100(input_shape, num_classes, hidden=tuple(hidden))


class LeNet5(nn.Module):
    def __init__(self, input_shape, num_classes, channels=(20, 50), fc=500):
        super().__init__()
        c, h, w = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, channels[0], 5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(channels[0], channels[1], 5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        hh, ww = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
        if hh < 1 or ww < 1:
            raise ValueError(f"LeNet-5 needs inputs of at least 16x16 pixels, got {h}x{w}")
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels[1] * hh * ww, fc),
            nn.ReLU(inplace=True),
            nn.Linear(fc, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


@register_model
def lenet5(input_shape, num_classes, channels=(20, 50), fc=500) -> nn.Module:
    return LeNet5(input_shape, num_classes, tuple(channels), fc)
