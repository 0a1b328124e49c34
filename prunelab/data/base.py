"""Base Lightning data modules shared by every prunelab dataset.

:class:`BaseDataModule` holds the common constructor contract (``data_dir``, ``batch_size``, ``eval_batch_size``,
``val_fraction``, ``seed``, ``num_workers``, ``augment``) and the device-side batch hook; :class:`TensorDataModule`
is the in-memory fast path: splits held as tensors (uint8 kept on the host), served in whole batches by index,
converted / augmented / normalised batched on the device in ``on_after_batch_transfer``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from prunelab.data.batched import (
    BatchIndexDataset,
    Chunk,
    batch_loader,
    epoch_permutation,
    epoch_seed,
    steps_per_call,
)
from prunelab.data.transforms import augment_batch, normalize, resize_center_crop, to_float

log = logging.getLogger(__name__)

Batch = tuple[Tensor, Tensor]
TEST_SPLIT_STREAM = 1  # carve_split stream used to carve a test split (validation uses 0)
_SCORE_STREAM = 1 << 21  # epoch id reserved for the score_batches stream (never a real training epoch)
_SPLIT_STREAM = (1 << 20) + 1  # epoch id reserved for the validation / test carving permutation


def missing_data_error(
    directory: str | Path,
    expected: Sequence[str],
    *,
    download_option: bool = True,
    cause: BaseException | None = None,
) -> FileNotFoundError:
    """A ``FileNotFoundError`` naming the directory, the files expected there and the ``data.download`` option."""
    msg = f"dataset files not found (or corrupted) in {str(directory)!r}; expected: {', '.join(expected)}."
    if download_option:
        msg += (
            " Set data.download=true to download them (needs network access), or place the files there"
            " yourself and keep data.download=false."
        )
    if cause is not None:
        msg += f" (underlying error: {type(cause).__name__}: {cause})"
    return FileNotFoundError(msg)


def carve_split(n: int, fraction: float, seed: int, stream: int = 0) -> tuple[Tensor, Tensor]:
    """Seeded split of ``range(n)`` into ``(kept, carved)`` index tensors (both sorted).

    ``carved`` holds ``round(n * fraction)`` indices (at least 1 when ``fraction > 0``, and never all of them).
    ``stream`` selects an independent permutation for the same seed (e.g. test carving vs validation carving).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"split fraction must be in [0, 1), got {fraction}")
    n_carved = int(round(n * fraction))
    if fraction > 0:
        n_carved = min(max(n_carved, 1), n - 1)
    perm = epoch_permutation(n, seed, _SPLIT_STREAM + stream)
    return perm[n_carved:].sort().values, perm[:n_carved].sort().values


def channel_stats(
    x: Tensor, pixel_scale: float, chunk: int = 4096
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of ``to_float(x, pixel_scale)`` over samples and pixels (chunked)."""
    c = x.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    count = 0
    for start in range(0, len(x), chunk):
        xb = to_float(x[start : start + chunk].cpu(), pixel_scale).to(torch.float64)
        total += xb.sum(dim=(0, 2, 3))
        total_sq += (xb * xb).sum(dim=(0, 2, 3))
        count += xb.shape[0] * xb.shape[2] * xb.shape[3]
    mean = total / count
    var = (total_sq / count - mean * mean).clamp_min(0.0)
    std = var.sqrt().clamp_min(1e-8)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


class BaseDataModule(pl.LightningDataModule):
    """Common constructor contract and device-side batch hook of every prunelab data module.

    Args:
        data_dir: root directory of the dataset files.
        batch_size: training batch size.
        eval_batch_size: validation / test batch size.
        val_fraction: fraction of the training set carved (seeded) into a validation split; 0 = no validation
            split, the validation loader is then the test loader.
        seed: seed of the splits, of the per-epoch shuffling and of the augmentation.
        num_workers: loader worker processes (file-streaming modules only; tensor modules serve batches in-process).
        augment: apply train-time augmentation.
        steps_per_call: training batches one Lightning step takes (tensor-held data): that many optimiser steps
            per call, in order, on the same batches as one per call, so Lightning's per-batch loop work is paid
            once per ``steps_per_call`` (see :func:`~prunelab.data.batched.steps_per_call` for when it is 1).

    Subclasses take their own options and pass the ones above on (``**common``): the option checks follow the
    ``**kwargs`` of a constructor up to this one.
    """

    name: str = "base"

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        eval_batch_size: int = 512,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        augment: bool = False,
        steps_per_call: int = 10,
    ) -> None:
        super().__init__()
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1, got {batch_size} / {eval_batch_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.data_dir = str(data_dir)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size)
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.augment = bool(augment)
        if steps_per_call < 1:
            raise ValueError(f"data.steps_per_call={steps_per_call}: must be an integer >= 1")
        self.steps_per_call = int(steps_per_call)
        self._epoch = 0
        self._input_shape: tuple[int, int, int] | None = None
        self._num_classes: int | None = None

    # ----------------------------------------------------------------------------------------- metadata
    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the batches the model receives (available after :meth:`setup`)."""
        if self._input_shape is None:
            raise RuntimeError(f"{type(self).__name__}.input_shape is only known after setup()")
        return self._input_shape

    @property
    def num_classes(self) -> int:
        """Number of classes (available after :meth:`setup`)."""
        if self._num_classes is None:
            raise RuntimeError(f"{type(self).__name__}.num_classes is only known after setup()")
        return self._num_classes

    # ----------------------------------------------------------------------------------------- epochs
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose (deterministic, from ``(seed, epoch)``) training order is served.

        When the module is attached to a Trainer, the order follows ``trainer.current_epoch`` instead.
        """
        self._epoch = int(epoch)

    def current_epoch(self) -> int:
        """The epoch used for the training order: the trainer's when attached, else the last :meth:`set_epoch`."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.current_epoch)
        return self._epoch

    def _is_training(self) -> bool:
        trainer = getattr(self, "trainer", None)
        return bool(trainer is not None and trainer.training)

    # ----------------------------------------------------------------------------------------- batches
    def process_batch(self, x: Tensor, y: Tensor, train: bool) -> Batch:
        """Turn a transferred batch into ``(float32 N x C x H x W, int64)``; subclasses add normalisation."""
        return x.to(torch.float32), y.to(torch.int64)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Lightning hook (runs on the model's device): convert, augment when training, normalise; a
        :class:`~prunelab.data.batched.Chunk` batch by batch, in order (the augmentation draws of one per call)."""
        train = self._is_training()
        if isinstance(batch, Chunk):
            done = [self.process_batch(batch.x[j], batch.y[j], train=train) for j in range(len(batch.x))]
            return Chunk(tuple(x for x, _ in done), tuple(y for _, y in done), batch.start)
        x, y = batch
        return self.process_batch(x, y, train=train)

    def to_device(self, device: torch.device | str) -> None:
        """Move in-memory tensors onto ``device`` (no-op for file-streaming modules)."""

    def score_batches(self, num_batches: int, batch_size: int | None = None) -> list[Batch]:
        """Deterministic, normalised, non-augmented CPU batches from the training split (for pruning scorers)."""
        raise NotImplementedError


@dataclass
class TensorData:
    """Raw in-memory data returned by :meth:`TensorDataModule.load_tensors` (images N x C x H x W)."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    pixel_scale: float = 255.0
    num_classes: int | None = None


class TensorDataModule(BaseDataModule):
    """In-memory data module: splits held as tensors and served in whole batches by index.

    Subclasses implement :meth:`load_tensors`. The train-time augmentation is configured by the class attributes
    ``crop_padding`` (random crop of the input size after zero padding), ``hflip`` and ``resized_crop``
    (ImageNet-style random-resized-crop to that ``(H, W)``); normalisation uses ``mean``/``std`` (per channel,
    computed from the training split when ``None``).
    """

    crop_padding: int = 0
    hflip: bool = False
    resized_crop: tuple[int, int] | None = None

    def __init__(
        self,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        self.mean: tuple[float, ...] | None = None if mean is None else tuple(float(v) for v in mean)
        self.std: tuple[float, ...] | None = None if std is None else tuple(float(v) for v in std)
        if self.mean is not None and not all(math.isfinite(v) for v in self.mean):
            raise ValueError(f"data.mean={list(self.mean)}: must be finite numbers")
        if self.std is not None and not all(math.isfinite(v) and v > 0 for v in self.std):
            raise ValueError(f"data.std={list(self.std)}: must be finite and > 0")
        self.pixel_scale = 1.0
        self._splits: dict[str, Batch] = {}
        self._aug_gen: torch.Generator | None = None
        self._aug_key: tuple[str, int] | None = None

    # ----------------------------------------------------------------------------------------- loading
    def load_tensors(self) -> TensorData:
        """Load the full training set and the test set as tensors (subclass hook)."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Load the tensors once, carve the seeded validation split and fix the normalisation (idempotent)."""
        if self._splits:
            return
        data = self.load_tensors()
        self.check_finite(data.x_train, "training")
        self.check_finite(data.x_test, "test")
        x_tr, y_tr = data.x_train, data.y_train.to(torch.int64)
        keep, val = carve_split(len(x_tr), self.val_fraction, self.seed)
        self._splits = {
            "train": (x_tr[keep], y_tr[keep]),
            "val": (x_tr[val], y_tr[val]),
            "test": (data.x_test, data.y_test.to(torch.int64)),
        }
        self.pixel_scale = float(data.pixel_scale)
        if self.mean is None or self.std is None:
            self.mean, self.std = channel_stats(self._splits["train"][0], self.pixel_scale)
        c, h, w = (int(s) for s in x_tr.shape[1:])
        out_hw = self.resized_crop if self.resized_crop is not None else (h, w)
        self._input_shape = (c, int(out_hw[0]), int(out_hw[1]))
        labels_max = max(int(y_tr.max()), int(data.y_test.max()) if len(data.y_test) else 0)
        self._num_classes = data.num_classes if data.num_classes is not None else labels_max + 1
        log.info(
            "%s: %d train / %d val / %d test samples, input %s, %d classes",
            self.name, *(len(self._splits[s][0]) for s in ("train", "val", "test")),
            self._input_shape, self._num_classes,
        )  # fmt: skip

    def check_finite(self, x: Tensor, split: str) -> None:
        """Raise when floating-point images hold NaN/Inf (every loss would be NaN); uint8 images cannot."""
        if not x.is_floating_point():
            return
        bad = int(x.numel() - torch.isfinite(x).sum())
        if bad:
            raise ValueError(f"data={self.name}: the {split} images hold {bad} non-finite values (NaN/Inf) of "
                             f"{x.numel()}; check the data options (data.*) or the files they point to")

    def split(self, name: str) -> Batch:
        """The raw ``(x, y)`` tensors of split ``name`` in ``{"train", "val", "test"}`` (after :meth:`setup`)."""
        if not self._splits:
            raise RuntimeError(f"{type(self).__name__}: call setup() before accessing the data")
        return self._splits[name]

    # ----------------------------------------------------------------------------------------- loaders
    def train_dataset(self) -> BatchIndexDataset:
        """Training batches (per-epoch permutation, last partial batch dropped)."""
        x, y = self.split("train")
        bs = self.batch_size
        if len(x) < bs:
            log.warning("%s: batch_size %d > %d training samples; using %d", self.name, bs, len(x), len(x))
            bs = len(x)
        return BatchIndexDataset(
            x, y, bs, shuffle=True, drop_last=True, seed=self.seed, epoch_fn=self.current_epoch
        )

    def eval_dataset(self, name: str) -> BatchIndexDataset:
        """Evaluation batches of split ``name`` in natural order, last partial batch kept."""
        x, y = self.split(name)
        return BatchIndexDataset(x, y, self.eval_batch_size, shuffle=False, drop_last=False)

    def train_dataloader(self) -> DataLoader:
        ds = self.train_dataset()
        ds.chunk = steps_per_call(self.steps_per_call, getattr(self, "trainer", None))
        return batch_loader(ds)

    def val_dataloader(self) -> DataLoader:
        return batch_loader(self.eval_dataset("val" if len(self.split("val")[0]) else "test"))

    def test_dataloader(self) -> DataLoader:
        return batch_loader(self.eval_dataset("test"))

    # ----------------------------------------------------------------------------------------- batch hook
    def _generator(self, device: torch.device) -> torch.Generator:
        """Augmentation generator on ``device``, reseeded from ``(seed, epoch)`` whenever the epoch changes."""
        key = (str(device), self.current_epoch())
        if self._aug_gen is None or self._aug_key != key:
            self._aug_gen = torch.Generator(device=device).manual_seed(epoch_seed(self.seed + 1, key[1]))
            self._aug_key = key
        return self._aug_gen

    def process_batch(self, x: Tensor, y: Tensor, train: bool) -> Batch:
        """``to_float`` -> (train and augment: batched crop / resized-crop / flip) -> per-channel normalisation."""
        if self.mean is None or self.std is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before processing batches")
        xf = to_float(x, self.pixel_scale)
        if train and self.augment:
            xf = augment_batch(
                xf,
                crop_padding=self.crop_padding,
                hflip=self.hflip,
                resized_crop=self.resized_crop,
                generator=self._generator(xf.device),
            )
        elif self.resized_crop is not None:
            xf = resize_center_crop(xf, self.resized_crop)
        return normalize(xf, self.mean, self.std), y.to(torch.int64)

    def to_device(self, device: torch.device | str) -> None:
        """Move the split tensors onto ``device`` (loaders created afterwards serve batches already there)."""
        self._splits = {k: (x.to(device), y.to(device)) for k, (x, y) in self._splits.items()}

    def score_batches(self, num_batches: int, batch_size: int | None = None) -> list[Batch]:
        """``num_batches`` seeded batches from the training split: normalised float, no augmentation, on CPU.

        The indices come from a fixed seeded permutation stream (wrapping into a new permutation when more
        samples are requested than the split holds), so the result depends only on ``(seed, num_batches,
        batch_size)``; it works right after :meth:`setup` without a Trainer.
        """
        x, y = self.split("train")
        x, y = x.cpu(), y.cpu()
        bs = int(batch_size or self.batch_size)
        need = num_batches * bs
        chunks, rnd = [], 0
        while sum(len(c) for c in chunks) < need:
            chunks.append(epoch_permutation(len(x), self.seed, _SCORE_STREAM + 2 + rnd))
            rnd += 1
        idx = torch.cat(chunks)[:need] if chunks else torch.empty(0, dtype=torch.int64)
        batches = []
        for b in range(num_batches):
            sel = idx[b * bs : (b + 1) * bs]
            batches.append(self.process_batch(x[sel], y[sel], train=False))
        return batches
