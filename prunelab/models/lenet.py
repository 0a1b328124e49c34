"""LeNet-300-100, the MLPs of BMRS, LeNet-5 as the pruning papers define it, and the Caffe "LeNet-5".

Which paper each model follows (checked against the authors' code):

* ``lenet_300_100``: 784-300-100-10 ReLU (LeCun et al. 1998; Han et al. 2015; Connectivity Matters'
  LeNet-300-100, ``avysogorets/effective-sparsity`` ``models.py``, without its optional BatchNorm).
* ``mlp``: a plain MLP of configurable hidden widths and activation. BMRS (Wright et al. 2024,
  ``saintslab/bmrs-structured-pruning`` ``modules/classifiers.py: make_mlp``) uses Tanh
  (``activation=tanh``): MNIST 7x100, Fashion-MNIST 1x150, CIFAR-10 5x150 (App. C).
* ``lenet5``: conv 6@5x5 - ReLU - pool 2 - conv 16@5x5 - ReLU - pool 2 - fc 120 - ReLU - fc 84 - ReLU - fc,
  the LeNet-5 of BMRS (``classifiers.py: lenet5``, max pooling; on C input channels the authors scale every
  width by C: 18-48-360-252 on CIFAR-10) and of Connectivity Matters (``models.py: Lenet5``, average pooling:
  ``pool=avg``). Both papers' codes use valid 5x5 convolutions; BMRS resizes 28x28 images to 32x32 (flatten
  16x5x5 = 400), prunelab feeds them at their size (16x4x4 = 256).
* ``lenet5_caffe``: conv 20@5x5 - pool - conv 50@5x5 - pool - fc 500 - fc, the Caffe net of the pruning
  literature (Han et al. 2015, Louizos et al. 2018, lottery-ticket code), with max pooling.

Initialisation: PyTorch's defaults (Kaiming-uniform, a = sqrt(5)) for every layer, as in the lottery-ticket,
SynFlow and BMRS code bases.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from prunelab.models.registry import register_model

ACTIVATIONS = {"relu": lambda: nn.ReLU(inplace=True), "tanh": nn.Tanh}
POOLS = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}


def check_choice(option: str, value, allowed) -> None:
    """A ValueError naming the option and the allowed values (models import nothing from ``pruning``)."""
    if value not in allowed:
        raise ValueError(f"{option}={value!r}; allowed values: {', '.join(map(str, allowed))}")


@register_model
def lenet_300_100(input_shape, num_classes, hidden=(300, 100), activation: str = "relu") -> nn.Module:
    """Fully connected 784-300-100-10 (LeCun et al. 1998; any flattened input size): the LeNet-300-100 of
    SNIP, GraSP, SynFlow and Connectivity Matters, and of the DLLP Fashion-MNIST runs here."""
    check_choice("model.activation", activation, tuple(ACTIVATIONS))
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@register_model
def mlp(input_shape, num_classes, hidden=(100,), activation: str = "relu") -> nn.Module:
    """A plain MLP with configurable hidden widths and activation (``relu`` | ``tanh``; BMRS: ``tanh``)."""
    return lenet_300_100(input_shape, num_classes, hidden=tuple(hidden), activation=activation)


class LeNet5(nn.Module):
    """Two valid 5x5 convolutions (ReLU, 2x2 pooling) and fully connected layers ``fc`` (ReLU) before the
    classifier. ``features`` / ``classifier`` layout: ``features.{0,3}`` convs, ``classifier.{1,3,...}`` fcs."""

    def __init__(self, input_shape, num_classes, channels=(6, 16), fc: Sequence[int] = (120, 84), pool="max"):
        super().__init__()
        check_choice("model.pool", pool, tuple(POOLS))
        c, h, w = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, channels[0], 5),
            nn.ReLU(inplace=True),
            POOLS[pool](2),
            nn.Conv2d(channels[0], channels[1], 5),
            nn.ReLU(inplace=True),
            POOLS[pool](2),
        )
        hh, ww = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
        if hh < 1 or ww < 1:
            raise ValueError(f"LeNet-5 needs inputs of at least 16x16 pixels, got {h}x{w}")
        layers: list[nn.Module] = [nn.Flatten()]
        width = channels[1] * hh * ww
        for f in fc:
            layers += [nn.Linear(width, f), nn.ReLU(inplace=True)]
            width = f
        layers.append(nn.Linear(width, num_classes))
        self.classifier = nn.Sequential(*layers)

    def forward(self, x):
        return self.classifier(self.features(x))


def _widths(fc) -> tuple[int, ...]:
    return (int(fc),) if isinstance(fc, int) else tuple(int(f) for f in fc)


@register_model
def lenet5(input_shape, num_classes, channels=(6, 16), fc=(120, 84), pool: str = "max") -> nn.Module:
    """LeNet-5 of BMRS (max pooling) and Connectivity Matters (``pool=avg``): 6-16 convs, fc 120-84."""
    return LeNet5(input_shape, num_classes, tuple(channels), _widths(fc), pool)


@register_model
def lenet5_caffe(input_shape, num_classes, channels=(20, 50), fc=(500,), pool: str = "max") -> nn.Module:
    """The Caffe "LeNet-5" of the pruning literature: 20-50 convs, fc 500 (430k parameters on MNIST)."""
    return LeNet5(input_shape, num_classes, tuple(channels), _widths(fc), pool)
