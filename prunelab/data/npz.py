"""Any in-memory image classification set stored as a NumPy ``.npz`` archive.

Arrays: ``x`` (N x C x H x W or N x H x W, uint8 or floating) and ``y`` (N integer labels), optionally ``x_test``
and ``y_test`` (otherwise a seeded test split of ``test_fraction`` is carved from ``x``/``y``).
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from prunelab.data.base import TEST_SPLIT_STREAM, TensorData, TensorDataModule, carve_split
from prunelab.data.registry import DATASETS
from prunelab.utils.io import file_fingerprint


def _images(arr: np.ndarray, path: Path, key: str) -> Tensor:
    """Validate an image array (uint8 or floating, 3-D or 4-D) and return it as an N x C x H x W tensor."""
    if arr.ndim not in (3, 4):
        raise ValueError(
            f"{path}: array {key!r} must be N x C x H x W or N x H x W, got shape {tuple(arr.shape)}"
        )
    if arr.dtype != np.uint8 and not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"{path}: array {key!r} must be uint8 or floating, got dtype {arr.dtype}")
    if min(arr.shape) < 1:
        raise ValueError(f"{path}: array {key!r} is empty (shape {tuple(arr.shape)})")
    if arr.dtype != np.uint8:
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if bad:
            raise ValueError(f"{path}: array {key!r} holds {bad} non-finite values (NaN/Inf); training on them "
                             "gives NaN losses. Fix or replace the file (data.path)")
    t = torch.from_numpy(np.ascontiguousarray(arr))
    t = t if t.dtype == torch.uint8 else t.to(torch.float32)
    return t.unsqueeze(1) if t.ndim == 3 else t


def _labels(arr: np.ndarray, n: int, path: Path, key: str) -> Tensor:
    """Validate a label array (1-D, integer-valued, non-negative, length ``n``) and return it as int64."""
    if arr.ndim != 1 or len(arr) != n:
        raise ValueError(f"{path}: array {key!r} must be 1-D with {n} labels, got shape {tuple(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            raise ValueError(f"{path}: array {key!r} holds non-finite labels (NaN/Inf)")
        if not np.issubdtype(arr.dtype, np.floating) or not np.all(np.mod(arr, 1) == 0):
            raise TypeError(f"{path}: array {key!r} must hold integer class labels, got dtype {arr.dtype}")
    if n and arr.min() < 0:
        raise ValueError(f"{path}: array {key!r} has negative labels (min {arr.min()})")
    return torch.from_numpy(arr.astype(np.int64))


@DATASETS.register("npz")
class NpzDataModule(TensorDataModule):
    """Tensor-held data from an ``.npz`` file (see the module docstring).

    Normalisation: per channel with ``mean``/``std`` if given, else computed on the training split after scaling
    (uint8 images are divided by 255, float images are used as they are).

    Args:
        path: the ``.npz`` file; a relative path not found as is is looked up under ``data_dir``.
        test_fraction: seeded test split carved from ``x``/``y`` when ``x_test``/``y_test`` are absent.
        num_classes: number of classes (default: max label + 1); must exceed every label.
        mean, std: per-channel normalisation constants (default: training-split statistics).
        crop_padding, hflip: train-time augmentation when ``augment`` (random crop with zero padding, flip).
        resized_crop: ``[H, W]`` for ImageNet-style random-resized-crop training / resize + center-crop eval
            (overrides ``crop_padding``); the model input is then ``(C, H, W)``.
        Other args: see :class:`~prunelab.data.base.BaseDataModule`.
    """

    name = "npz"

    def __init__(
        self,
        path: str,
        test_fraction: float = 0.2,
        num_classes: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        crop_padding: int = 4,
        hflip: bool = True,
        resized_crop: Sequence[int] | None = None,
        **common: Any,
    ) -> None:
        super().__init__(mean=mean, std=std, **common)
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        self.path = str(path)
        self.test_fraction = float(test_fraction)
        self.given_num_classes = None if num_classes is None else int(num_classes)
        self.crop_padding = int(crop_padding)
        self.hflip = bool(hflip)
        self.resized_crop = None if resized_crop is None else (int(resized_crop[0]), int(resized_crop[1]))
        self._fingerprint: dict[str, Any] | None = None

    def resolved_path(self) -> Path:
        """``path`` as given if it exists (or is absolute), else ``data_dir / path``."""
        p = Path(self.path)
        if p.is_absolute() or p.exists():
            return p
        return Path(self.data_dir) / p

    def prepare_data(self) -> None:
        """Check the file exists (nothing to download)."""
        p = self.resolved_path()
        if not p.is_file():
            raise FileNotFoundError(
                f"npz data file not found: {str(p)!r} (data.path={self.path!r}, data_dir={self.data_dir!r}); "
                "expected a .npz archive with arrays 'x', 'y' and optionally 'x_test', 'y_test'"
            )

    def fingerprint(self) -> dict[str, Any]:
        """Size and SHA-256 of the archive: part of the dense-cache key, so that a replaced file (same path,
        other data) is never served the dense model trained on the old one."""
        if self._fingerprint is None:
            self._fingerprint = file_fingerprint(self.resolved_path())
        return self._fingerprint

    def load_tensors(self) -> TensorData:
        self.prepare_data()
        p = self.resolved_path()
        try:
            with np.load(p, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(
                f"{p} (data.path={self.path!r}) is not a readable .npz archive ({type(e).__name__}); expected "
                "np.savez output with arrays 'x', 'y' and optionally 'x_test', 'y_test'"
            ) from None
        for key in ("x", "y"):
            if key not in arrays:
                raise KeyError(f"{p}: missing array {key!r} (found: {sorted(arrays)})")
        if ("x_test" in arrays) != ("y_test" in arrays):
            raise KeyError(f"{p}: 'x_test' and 'y_test' must be given together (found: {sorted(arrays)})")
        x = _images(arrays["x"], p, "x")
        y = _labels(arrays["y"], len(x), p, "y")
        if "x_test" in arrays:
            x_te = _images(arrays["x_test"], p, "x_test")
            y_te = _labels(arrays["y_test"], len(x_te), p, "y_test")
            if x_te.shape[1:] != x.shape[1:] or x_te.dtype != x.dtype:
                raise ValueError(
                    f"{p}: 'x_test' ({tuple(x_te.shape[1:])}, {x_te.dtype}) does not match "
                    f"'x' ({tuple(x.shape[1:])}, {x.dtype}) per sample"
                )
        else:
            train, test = carve_split(len(x), self.test_fraction, self.seed, stream=TEST_SPLIT_STREAM)
            x, y, x_te, y_te = x[train], y[train], x[test], y[test]
        max_label = int(max(y.max(), y_te.max()))
        if self.given_num_classes is not None and self.given_num_classes <= max_label:
            raise ValueError(f"{p}: num_classes={self.given_num_classes} but labels go up to {max_label}")
        n_cls = self.given_num_classes if self.given_num_classes is not None else max_label + 1
        scale = 255.0 if x.dtype == torch.uint8 else 1.0
        return TensorData(x, y, x_te, y_te, pixel_scale=scale, num_classes=n_cls)
