"""prunelab data modules (Lightning ``LightningDataModule``s instantiated by Hydra from ``conf/data/<name>.yaml``).

In-memory datasets (mnist, fashion_mnist, cifar10, cifar100, digits, npz, synthetic) are held as tensors and served
in whole batches by index; imagenet / tiny_imagenet stream image files. ``DATASETS.names()`` lists them all.

The names below are imported lazily (PEP 562): ``prunelab.data.SyntheticDataModule`` imports only the synthetic
module, so a run does not pay for scikit-learn (``digits``) or torchvision's dataset and transform modules it does
not use. Reading ``DATASETS`` imports every dataset module first, so the registry is always complete.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "BaseDataModule": "base",
    "TensorData": "base",
    "TensorDataModule": "base",
    "carve_split": "base",
    "missing_data_error": "base",
    "BatchIndexDataset": "batched",
    "batch_loader": "batched",
    "epoch_permutation": "batched",
    "DigitsDataModule": "digits",
    "ImageFolderDataModule": "folder",
    "ImageNetDataModule": "folder",
    "TinyImageNetDataModule": "folder",
    "TinyImageNetVal": "folder",
    "NpzDataModule": "npz",
    "SyntheticDataModule": "synthetic",
    "Cifar10DataModule": "vision",
    "Cifar100DataModule": "vision",
    "FashionMnistDataModule": "vision",
    "MnistDataModule": "vision",
    "TorchvisionDataModule": "vision",
}
# Modules whose import registers datasets in DATASETS.
_DATASET_MODULES = ("digits", "folder", "npz", "synthetic", "vision")

__all__ = [
    "BaseDataModule",
    "BatchIndexDataset",
    "Cifar100DataModule",
    "Cifar10DataModule",
    "DATASETS",
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


def __getattr__(name: str) -> Any:
    if name == "DATASETS":
        for mod in _DATASET_MODULES:
            importlib.import_module(f"{__name__}.{mod}")
        from prunelab.data.registry import DATASETS

        return DATASETS
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:  # static analysers and IDEs see the eager imports
    from prunelab.data.base import (
        BaseDataModule,
        TensorData,
        TensorDataModule,
        carve_split,
        missing_data_error,
    )
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
