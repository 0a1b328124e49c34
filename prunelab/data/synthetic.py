"""A seeded, learnable synthetic classification dataset (no files).

Each class ``k`` has a fixed random prototype ``P_k`` (a standard-normal pattern drawn at 1/4 of the resolution
and upsampled by nearest neighbour, so it survives convolutions and pooling); a sample of class ``y`` is
``x = signal * P_y + noise * eps`` with ``eps ~ N(0, I)``. Labels are balanced (``i mod K``, shuffled). The
Bayes-optimal (nearest-prototype) classifier separates classes ``i, j`` with margin
``signal * ||P_i - P_j|| / (2 * noise)`` standard deviations, so the task is easy at the defaults and becomes
chance-level as ``signal -> 0``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from prunelab.data.base import TensorData, TensorDataModule
from prunelab.data.batched import epoch_seed
from prunelab.data.registry import DATASETS

_DATA_STREAM = 1 << 22


def make_synthetic(
    input_shape: Sequence[int],
    num_classes: int,
    num_samples: int,
    *,
    prototypes: Tensor,
    noise: float,
    signal: float,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Draw ``num_samples`` samples ``signal * prototypes[y] + noise * N(0, I)`` with balanced shuffled labels."""
    y = (torch.arange(num_samples) % num_classes)[torch.randperm(num_samples, generator=generator)]
    eps = torch.randn(num_samples, *input_shape, generator=generator)
    return signal * prototypes[y] + noise * eps, y


def make_prototypes(input_shape: Sequence[int], num_classes: int, generator: torch.Generator) -> Tensor:
    """``num_classes`` standard-normal patterns of ``input_shape``, drawn at 1/4 resolution, nearest-upsampled."""
    c, h, w = input_shape
    low = torch.randn(num_classes, c, max(1, h // 4), max(1, w // 4), generator=generator)
    return F.interpolate(low, size=(h, w), mode="nearest")


@DATASETS.register("synthetic")
class SyntheticDataModule(TensorDataModule):
    """Seeded prototype-plus-noise data (see the module docstring); same seed -> identical tensors.

    Args:
        input_shape: ``[C, H, W]``.
        num_classes: number of classes.
        num_train: training samples (the validation split is carved from them).
        num_test: test samples.
        noise: standard deviation of the additive Gaussian noise.
        signal: prototype amplitude (0 = labels carry no information).
        Other args: see :class:`~prunelab.data.base.BaseDataModule` (``data_dir`` unused).
    """

    name = "synthetic"

    def __init__(
        self,
        input_shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 10,
        num_train: int = 2048,
        num_test: int = 512,
        noise: float = 1.0,
        signal: float = 1.0,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"input_shape must be [C, H, W] with positive sizes, got {list(input_shape)}")
        if num_classes < 2 or num_train < num_classes or num_test < 1 or noise < 0:
            raise ValueError(
                f"need num_classes >= 2, num_train >= num_classes, num_test >= 1, noise >= 0; got "
                f"{num_classes}, {num_train}, {num_test}, {noise}"
            )
        self.shape: tuple[int, int, int] = (shape[0], shape[1], shape[2])
        self.n_classes = int(num_classes)
        self.num_train = int(num_train)
        self.num_test = int(num_test)
        self.noise = float(noise)
        self.signal = float(signal)
        self.prototypes: Tensor | None = None

    def prepare_data(self) -> None:
        """Nothing to download (generated in ``setup``)."""

    def load_tensors(self) -> TensorData:
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, _DATA_STREAM))
        self.prototypes = make_prototypes(self.shape, self.n_classes, gen)
        kw = {"prototypes": self.prototypes, "noise": self.noise, "signal": self.signal, "generator": gen}
        x_tr, y_tr = make_synthetic(self.shape, self.n_classes, self.num_train, **kw)
        x_te, y_te = make_synthetic(self.shape, self.n_classes, self.num_test, **kw)
        return TensorData(x_tr, y_tr, x_te, y_te, pixel_scale=1.0, num_classes=self.n_classes)
