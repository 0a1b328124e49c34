"""MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100 through ``torchvision.datasets``, held as uint8 tensors.

The torchvision class is used for the download and for parsing its file format; the images are then converted
once to an ``N x C x H x W`` uint8 tensor (``.data``) and an int64 label tensor (``.targets``) served by the
tensor fast path of :class:`~prunelab.data.base.TensorDataModule`.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision import datasets as tvd

from prunelab.data.base import TensorData, TensorDataModule, missing_data_error
from prunelab.data.registry import DATASETS

log = logging.getLogger(__name__)

# Errors torchvision raises when files are missing / corrupted (RuntimeError) or the network is down (URLError is an
# OSError subclass).
_LOAD_ERRORS = (RuntimeError, OSError)


class TorchvisionDataModule(TensorDataModule):
    """Common code of the torchvision-backed in-memory modules (see the module docstring).

    Args:
        download: let torchvision download missing files into ``data_dir`` (``prepare_data``); with ``False``
            missing files raise a ``FileNotFoundError`` naming the directory and the expected files.
        Other args: see :class:`~prunelab.data.base.BaseDataModule`.
    """

    dataset_cls: Any = None
    default_mean: tuple[float, ...] = ()
    default_std: tuple[float, ...] = ()

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        eval_batch_size: int = 512,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        augment: bool = False,
        download: bool = True,
    ) -> None:
        super().__init__(
            data_dir, batch_size, eval_batch_size, val_fraction, seed, num_workers, augment,
            mean=self.default_mean, std=self.default_std,
        )  # fmt: skip
        self.download = bool(download)

    # ------------------------------------------------------------------------- file layout (subclass hooks)
    def raw_dir(self) -> Path:
        """Directory holding the files torchvision reads."""
        raise NotImplementedError

    def expected_files(self) -> list[str]:
        """File names expected in :meth:`raw_dir`."""
        raise NotImplementedError

    def _files_present(self) -> bool:
        self._prepare_local_files()
        return all((self.raw_dir() / f).is_file() for f in self.expected_files())

    def _prepare_local_files(self) -> None:
        """Hook to normalise a local layout before the existence check (e.g. decompress ``.gz``)."""

    def _missing(self, cause: BaseException | None = None) -> FileNotFoundError:
        return missing_data_error(self.raw_dir(), self.expected_files(), cause=cause)

    # ------------------------------------------------------------------------- Lightning hooks
    def prepare_data(self) -> None:
        """Download the files if missing and ``download`` is set; otherwise check they are there (cheap)."""
        if self._files_present():
            return
        if not self.download:
            raise self._missing()
        log.info("%s: downloading into %s", self.name, self.data_dir)
        try:
            self.dataset_cls(root=self.data_dir, train=True, download=True)
        except _LOAD_ERRORS as err:
            raise self._missing(err) from err

    def _open(self, train: bool) -> Any:
        try:
            return self.dataset_cls(root=self.data_dir, train=train, download=False)
        except _LOAD_ERRORS as err:
            raise self._missing(err) from err

    def load_tensors(self) -> TensorData:
        """Read both splits with torchvision (no download here: that is ``prepare_data``'s job) as tensors."""
        if not self._files_present():
            if not self.download:
                raise self._missing()
            self.prepare_data()
        train, test = self._open(True), self._open(False)
        x_tr, y_tr = self._to_tensors(train)
        x_te, y_te = self._to_tensors(test)
        return TensorData(x_tr, y_tr, x_te, y_te, pixel_scale=255.0, num_classes=len(train.classes))

    @staticmethod
    def _to_tensors(ds: Any) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


def _gunzip_missing(raw: Path, names: list[str]) -> None:
    """For every ``name`` absent from ``raw`` but present as ``name.gz``, decompress it (atomic rename)."""
    for name in names:
        target, packed = raw / name, raw / f"{name}.gz"
        if target.is_file() or not packed.is_file():
            continue
        tmp = raw / f".{name}.{os.getpid()}.tmp"
        with gzip.open(packed, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, target)
        log.info("decompressed %s", packed)


class _MnistLike(TorchvisionDataModule):
    """MNIST-format (IDX) datasets: ``<data_dir>/<ClassName>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``.

    Like torchvision's own download, gzip-compressed ``.gz`` files found there are decompressed in place.
    """

    def raw_dir(self) -> Path:
        return Path(self.data_dir) / self.dataset_cls.__name__ / "raw"

    def expected_files(self) -> list[str]:
        return [os.path.splitext(name)[0] for name, _ in self.dataset_cls.resources]

    def _missing(self, cause: BaseException | None = None) -> FileNotFoundError:
        names = [f"{n} (or {n}.gz)" for n in self.expected_files()]
        return missing_data_error(self.raw_dir(), names, cause=cause)

    def _prepare_local_files(self) -> None:
        if self.raw_dir().is_dir():
            _gunzip_missing(self.raw_dir(), self.expected_files())

    @staticmethod
    def _to_tensors(ds: Any) -> tuple[Tensor, Tensor]:
        x = torch.as_tensor(ds.data, dtype=torch.uint8).unsqueeze(1).contiguous()  # N x 1 x 28 x 28
        return x, torch.as_tensor(ds.targets, dtype=torch.int64)


class _CifarLike(TorchvisionDataModule):
    """CIFAR python-pickle batches in ``<data_dir>/<base_folder>`` (md5-checked by torchvision).

    Augmentation is on by default: random crop 32 with zero padding 4 + horizontal flip, batched on the device.
    """

    crop_padding = 4
    hflip = True

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        eval_batch_size: int = 512,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        augment: bool = True,
        download: bool = True,
    ) -> None:
        super().__init__(
            data_dir, batch_size, eval_batch_size, val_fraction, seed, num_workers, augment, download
        )

    def raw_dir(self) -> Path:
        return Path(self.data_dir) / self.dataset_cls.base_folder

    def expected_files(self) -> list[str]:
        cls = self.dataset_cls
        return [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]

    @staticmethod
    def _to_tensors(ds: Any) -> tuple[Tensor, Tensor]:
        x = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
        return x, torch.as_tensor(ds.targets, dtype=torch.int64)


@DATASETS.register("mnist")
class MnistDataModule(_MnistLike):
    """MNIST (LeCun et al. 1998): 60k/10k 28x28 grey digits. Augmentation (opt-in): random crop, padding 2."""

    name = "mnist"
    dataset_cls = tvd.MNIST
    default_mean = (0.1307,)
    default_std = (0.3081,)
    crop_padding = 2


@DATASETS.register("fashion_mnist")
class FashionMnistDataModule(_MnistLike):
    """Fashion-MNIST (Xiao et al. 2017). Augmentation (opt-in): random crop (padding 2) + horizontal flip."""

    name = "fashion_mnist"
    dataset_cls = tvd.FashionMNIST
    default_mean = (0.2860,)
    default_std = (0.3530,)
    crop_padding = 2
    hflip = True


@DATASETS.register("cifar10")
class Cifar10DataModule(_CifarLike):
    """CIFAR-10 (Krizhevsky 2009); augmentation: random crop 32 with padding 4 + horizontal flip."""

    name = "cifar10"
    dataset_cls = tvd.CIFAR10
    default_mean = (0.4914, 0.4822, 0.4465)
    default_std = (0.2470, 0.2435, 0.2616)


@DATASETS.register("cifar100")
class Cifar100DataModule(_CifarLike):
    """CIFAR-100 (fine labels); augmentation: random crop 32 with padding 4 + horizontal flip."""

    name = "cifar100"
    dataset_cls = tvd.CIFAR100
    default_mean = (0.5071, 0.4865, 0.4409)
    default_std = (0.2673, 0.2564, 0.2762)
