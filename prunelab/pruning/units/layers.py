"""The layer types every structured method agrees on (one set of tuples, used by groups, sites, BMRS, DLLP,
Taylor).

- ``UNIT_TYPES``: layers whose output channels / features are units (the roots of dependency groups);
- ``NORM_TYPES``: normalisation layers over a unit's channel (their affine shift is part of the unit's output,
  so a multiplier placed after the layer goes after its normalisation); ``BN_TYPES`` the BatchNorms among them;
- ``ACTIVATION_TYPES``: element-wise non-linearities a multiplier may follow; ``HOMOGENEOUS_TYPES`` those with
  ``act(c x) = c act(x)`` for ``c >= 0``, after which a per-unit factor can be folded into the layer before.
"""

from __future__ import annotations

from torch import nn

UNIT_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
)
BN_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Softplus,
)
HOMOGENEOUS_TYPES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.LeakyReLU, nn.Identity)


def out_units(layer: nn.Module) -> int:
    """Number of units (output features / channels) of a ``UNIT_TYPES`` layer."""
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def channel_dim(module: nn.Module) -> int:
    """Dimension of a module's output that holds its channels / features."""
    return -1 if isinstance(module, (nn.Linear, nn.LayerNorm)) else 1
