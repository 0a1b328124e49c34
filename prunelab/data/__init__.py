"""prunelab data modules (Lightning ``LightningDataModule``s instantiated by Hydra from ``conf/data/<name>.yaml``).

In-memory datasets (mnist, fashion_mnist, cifar10, cifar100, digits, npz, synthetic) are held as tensors and served
in whole batches by index; imagenet / tiny_imagenet stream image files. ``DATASETS.names()`` lists them all.
Heavy optional imports (scikit-learn for ``digits``) happen when a dataset is loaded, not when this package is.
"""

from __future__ import annotations

from prunelab.data.base import BaseDataModule, TensorData, TensorDataModule, carve_split, missing_data_error
from prunelab.data.batched import BatchIndexDataset, batch_loader, epoch_permutation
from prunelab.data.digits import DigitsDataModule
from prunelab.data.folder import (
    ImageFolderDataModule,
    ImageNetDataModule,
    TinyImageNetDataModule,
    TinyImageNetVal,
)
from prunelab.data.npz import NpzDataModule
from prunelab.data.registry import DATASETS
from prunelab.data.synthetic import SyntheticDataModule
from prunelab.data.vision import (
    Cifar10DataModule,
    Cifar100DataModule,
    FashionMnistDataModule,
    MnistDataModule,
    TorchvisionDataModule,
)

__all__ = [
    "DATASETS",
    "BaseDataModule",
    "BatchIndexDataset",
    "Cifar100DataModule",
    "Cifar10DataModule",
    "DigitsDataModule",
    "FashionMnistDataModule",
    "ImageFolderDataModule",
    "ImageNetDataModule",
    "MnistDataModule",
    "NpzDataModule",
    "SyntheticDataModule",
    "TensorData",
    "TensorDataModule",
    "TinyImageNetDataModule",
    "TinyImageNetVal",
    "TorchvisionDataModule",
    "batch_loader",
    "carve_split",
    "epoch_permutation",
    "missing_data_error",
]
