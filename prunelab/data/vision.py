"""MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100 through ``torchvision.datasets``, held as uint8 tensors.

The torchvision class is used for the download and for parsing its file format; the images are then converted
once to an ``N x C x H x W`` uint8 tensor (``.data``) and an int64 label tensor (``.targets``) served by the
tensor fast path of :class:`~prunelab.data.base.TensorDataModule`.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import struct
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

    def __init__(self, download: bool = True, **common: Any) -> None:
        super().__init__(mean=self.default_mean, std=self.default_std, **common)
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


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _with_header(data: bytes, mtime: int, name: str) -> bytes:
    """``data`` (a gzip member) with its header replaced by one carrying ``mtime`` and the file name ``name``
    (FLG.FNAME), XFL 0 and OS 3 (Unix): the deflate stream and the CRC32/size trailer are kept byte for byte."""
    flg = data[3]
    if data[:3] != b"\x1f\x8b\x08" or flg & ~0x08:  # only a bare header or one with a name: nothing else to skip
        return data
    body = 10
    if flg & 0x08:
        body = data.index(b"\0", 10) + 1
    return b"\x1f\x8b\x08\x08" + struct.pack("<I", mtime) + b"\x00\x03" + name.encode() + b"\0" + data[body:]


class _MnistLike(TorchvisionDataModule):
    """MNIST-format (IDX) datasets: ``<data_dir>/<ClassName>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``.

    Like torchvision's own download, gzip-compressed ``.gz`` files found there are decompressed in place.

    ``source_dir``: a folder holding the four official ``*-idx?-ubyte.gz`` files (a local copy, no network).
    When ``raw`` lacks the files, each one is md5-checked against the md5 torchvision checks for its download
    (``dataset_cls.resources``) and decompressed into ``raw``; torchvision then parses them as usual. ``"auto"``
    (the default) uses the first complete folder of ``system_dirs`` (Fashion-MNIST: the Debian/Ubuntu package
    ``dataset-fashion-mnist``), ``None`` never looks outside ``data_dir``. A wrong md5 is an error naming the
    file. Debian's packaging normalises gzip headers (strip-nondeterminism: file name dropped, mtime set to the
    build date) without touching the compressed data; such a file is checked with its original header restored
    (``official_headers``: the mtime and name of each official file), so the md5 compared is still
    torchvision's.
    """

    system_dirs: tuple[str, ...] = ()
    official_headers: dict[str, int] = {}  # official .gz name -> mtime of its original gzip header

    def __init__(self, source_dir: str | None = "auto", **common: Any) -> None:
        super().__init__(**common)
        self.source_dir = None if source_dir in (None, "", "none", "null") else str(source_dir)

    def raw_dir(self) -> Path:
        return Path(self.data_dir) / self.dataset_cls.__name__ / "raw"

    def expected_files(self) -> list[str]:
        return [os.path.splitext(name)[0] for name, _ in self.dataset_cls.resources]

    def _missing(self, cause: BaseException | None = None) -> FileNotFoundError:
        names = [f"{n} (or {n}.gz)" for n in self.expected_files()]
        return missing_data_error(self.raw_dir(), names, cause=cause)

    def _raw_complete(self) -> bool:
        raw = self.raw_dir()
        return all((raw / n).is_file() or (raw / f"{n}.gz").is_file() for n in self.expected_files())

    def source(self) -> Path | None:
        """The folder the official files are taken from: ``source_dir``, or the first complete
        ``system_dirs`` folder when ``source_dir="auto"``, or ``None``."""
        if self.source_dir is None:
            return None
        gz = [name for name, _ in self.dataset_cls.resources]
        if self.source_dir != "auto":
            src = Path(self.source_dir).expanduser()
            missing = [n for n in gz if not (src / n).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"data.source_dir={str(src)!r}: missing {', '.join(missing)} (the official {self.name} files: "
                    f"{', '.join(gz)})"
                )
            return src
        for d in self.system_dirs:
            if all((Path(d) / n).is_file() for n in gz):
                return Path(d)
        return None

    def _import_official(self, src: Path) -> None:
        """md5-check the official ``.gz`` files in ``src`` and decompress them into :meth:`raw_dir`."""
        raw = self.raw_dir()
        raw.mkdir(parents=True, exist_ok=True)
        for gz_name, md5 in self.dataset_cls.resources:
            path = src / gz_name
            data = path.read_bytes()
            got = _md5(data)
            if got != md5 and gz_name in self.official_headers:
                restored = _with_header(data, self.official_headers[gz_name], os.path.splitext(gz_name)[0])
                if _md5(restored) == md5:
                    got = md5  # same compressed data as the official file, header normalised by the packager
            if got != md5:
                raise ValueError(
                    f"data.source_dir: {path} has md5 {got}, expected {md5} (the md5 torchvision checks for the "
                    f"official {gz_name}); the file is corrupted or not the official {self.name} file"
                )
            target = raw / os.path.splitext(gz_name)[0]
            tmp = raw / f".{target.name}.{os.getpid()}.tmp"
            tmp.write_bytes(gzip.decompress(data))
            os.replace(tmp, target)
        log.info("%s: official files from %s (md5-checked) decompressed into %s", self.name, src, raw)

    def _prepare_local_files(self) -> None:
        if not self._raw_complete():
            src = self.source()
            if src is not None:
                self._import_official(src)
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

    def __init__(self, augment: bool = True, **common: Any) -> None:
        super().__init__(augment=augment, **common)

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
    # `apt-get install dataset-fashion-mnist` (Debian / Ubuntu) puts the four official files here, their gzip
    # headers normalised (no file name; mtime 1591347949, the package build of 0.0~git20200523.55506a9-1).
    # The official headers carry these mtimes (GNU gzip, XFL 0, OS 3, with the file name): with them restored
    # the package's files have exactly torchvision's md5s (searched once over the mtimes, 2026-11-29).
    system_dirs = ("/usr/share/datasets/fashion-mnist",)
    official_headers = {
        "train-images-idx3-ubyte.gz": 1504176606,  # 2017-08-31 10:50:06 UTC
        "train-labels-idx1-ubyte.gz": 1504176606,
        "t10k-images-idx3-ubyte.gz": 1504176627,  # 2017-08-31 10:50:27 UTC
        "t10k-labels-idx1-ubyte.gz": 1504176627,
    }


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
