"""scikit-learn's bundled 8x8 digits (UCI optical digits): 1797 images, 17 grey levels (0..16), 10 classes.

No download and tiny: the embedded default dataset of the demo. Held as uint8 (values 0..16, ``pixel_scale`` 16).
"""

from __future__ import annotations

from typing import Any

import torch

from prunelab.data.base import TEST_SPLIT_STREAM, TensorData, TensorDataModule, carve_split
from prunelab.data.registry import DATASETS


@DATASETS.register("digits")
class DigitsDataModule(TensorDataModule):
    """``sklearn.datasets.load_digits()``: seeded train/test split (``test_fraction``, default 80/20), then the
    validation split carved from the training part; input ``(1, 8, 8)``, normalised with the training split's
    mean/std. Opt-in augmentation: random crop with padding 1 (no flip: digits are not mirror-symmetric).

    Args:
        test_fraction: fraction of the 1797 images held out as the test set.
        data_dir: unused (the data ships with scikit-learn); kept for the common interface.
        Other args: see :class:`~prunelab.data.base.BaseDataModule`.
    """

    name = "digits"
    crop_padding = 1

    def __init__(self, test_fraction: float = 0.2, **common: Any) -> None:
        super().__init__(**common)
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        self.test_fraction = float(test_fraction)

    def prepare_data(self) -> None:
        """Nothing to download (bundled with scikit-learn)."""

    def load_tensors(self) -> TensorData:
        from sklearn.datasets import load_digits  # here, not at import: scikit-learn costs ~0.3 s

        bunch = load_digits()
        x = torch.from_numpy(bunch.images).round().to(torch.uint8).unsqueeze(1).contiguous()  # N x 1 x 8 x 8
        y = torch.from_numpy(bunch.target).to(torch.int64)
        train, test = carve_split(len(x), self.test_fraction, self.seed, stream=TEST_SPLIT_STREAM)
        return TensorData(x[train], y[train], x[test], y[test], pixel_scale=16.0, num_classes=10)
