"""VGG-19 with BatchNorm, CIFAR variant of the pruning literature (SNIP, GraSP, SynFlow, Connectivity
Matters): the 16 conv layers of VGG-19, global average pooling and one linear classifier 512 -> classes.

Initialisation: Kaiming-normal conv weights (fan_out), BatchNorm (1, 0), default linear.
"""

from __future__ import annotations

from torch import nn

from prunelab.models.registry import kaiming_init, register_model

CFG = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    def __init__(self, cfg, input_shape, num_classes, batch_norm=True, width=1.0):
        super().__init__()
        layers: list[nn.Module] = []
        c = input_shape[0]
        size = min(input_shape[1:])
        for v in cfg:
            if v == "M":
                if size >= 2:  # small inputs keep their last pixels instead of pooling them away
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                continue
            v = max(1, int(round(v * width)))
            layers.append(nn.Conv2d(c, v, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU(inplace=True))
            c = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)
        kaiming_init(self)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def _vgg(name):
    def factory(input_shape, num_classes, batch_norm: bool = True, width: float = 1.0) -> nn.Module:
        return VGG(CFG[name], input_shape, num_classes, batch_norm, width)

    factory.__name__ = name
    factory.__doc__ = f"{name.upper()} (BatchNorm, CIFAR-style classifier)."
    return factory


for _n in CFG:
    register_model(_vgg(_n), name=_n)
