"""File-streaming image-folder datasets: ImageNet and Tiny-ImageNet.

Layout: ``<data_dir>/<root_subdir>/train/<class>/...image`` (any depth below the class folder) and the test set in
``<data_dir>/<root_subdir>/val/``, either as class folders (ImageFolder layout) or in Tiny-ImageNet's official
layout ``val/images/*.JPEG`` + ``val/val_annotations.txt`` (read in place, no copying). The validation split is
carved (seeded) from ``train/``. Per-sample torchvision ``transforms.v2`` run in the loader workers.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import default_loader
from torchvision.transforms import v2

from prunelab.data.base import _SCORE_STREAM, BaseDataModule, Batch, carve_split, missing_data_error
from prunelab.data.batched import epoch_permutation
from prunelab.data.registry import DATASETS

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TINY_IMAGENET_MEAN = (0.4802, 0.4481, 0.3975)
TINY_IMAGENET_STD = (0.2770, 0.2691, 0.2821)
ANNOTATIONS = "val_annotations.txt"


class EpochRandomSampler(RandomSampler):
    """A ``RandomSampler`` whose order is :func:`epoch_permutation` ``(n, seed, epoch_fn())``.

    Subclassing ``RandomSampler`` keeps Lightning treating the loader as shuffled (under DDP it substitutes a
    shuffling ``DistributedSampler``).
    """

    def __init__(self, data_source: Any, seed: int, epoch_fn: Callable[[], int]) -> None:
        super().__init__(data_source)
        self.seed = int(seed)
        self.epoch_fn = epoch_fn

    def __iter__(self) -> Iterator[int]:
        yield from epoch_permutation(len(self.data_source), self.seed, self.epoch_fn()).tolist()


class FolderWithClasses(ImageFolder):
    """``ImageFolder`` using a given ``class_to_idx`` (the training set's), so test labels match train labels."""

    def __init__(
        self, root: str | Path, class_to_idx: dict[str, int], transform: Callable | None = None
    ) -> None:
        self._given = dict(class_to_idx)
        super().__init__(str(root), transform=transform, allow_empty=True)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        return sorted(self._given, key=self._given.__getitem__), self._given


class TinyImageNetVal(Dataset[tuple[Any, int]]):
    """Tiny-ImageNet's official validation layout read in place: ``val/images/<file>`` labelled by
    ``val/val_annotations.txt`` (tab-separated ``file, wnid, x0, y0, x1, y1``), mapped through ``class_to_idx``."""

    def __init__(
        self, val_dir: str | Path, class_to_idx: dict[str, int], transform: Callable | None = None
    ) -> None:
        val_dir = Path(val_dir)
        self.transform = transform
        self.samples: list[tuple[str, int]] = []
        for line_no, line in enumerate((val_dir / ANNOTATIONS).read_text().splitlines(), 1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2 or fields[1] not in class_to_idx:
                raise ValueError(f"{val_dir / ANNOTATIONS}:{line_no}: bad line or unknown class: {line!r}")
            self.samples.append((str(val_dir / "images" / fields[0]), class_to_idx[fields[1]]))
        self.targets = [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, target = self.samples[index]
        img = default_loader(path)
        return (self.transform(img) if self.transform is not None else img), target


def _to_tensor_tf(mean: tuple[float, ...], std: tuple[float, ...]) -> list[Any]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


class ImageFolderDataModule(BaseDataModule):
    """Streaming ImageFolder data module (see the module docstring).

    Args:
        root_subdir: sub-directory of ``data_dir`` holding ``train/`` and ``val/``.
        image_size: side of the (square) model input.
        resize_size: evaluation resize of the short side before the ``image_size`` center crop.
        Other args: see :class:`~prunelab.data.base.BaseDataModule`.
    """

    name = "imagefolder"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __init__(
        self,
        augment: bool = True,
        root_subdir: str = "imagenet",
        image_size: int = 224,
        resize_size: int = 256,
        **common: Any,
    ) -> None:
        super().__init__(augment=augment, **common)
        self.root_subdir = root_subdir
        self.image_size = int(image_size)
        self.resize_size = int(resize_size)
        self._train: Subset | None = None
        self._val: Subset | None = None
        self._test: Dataset | None = None
        self._plain_train: Dataset | None = None

    # ------------------------------------------------------------------------- transforms
    def train_transform(self) -> v2.Compose:
        """ImageNet-style: random-resized-crop ``image_size`` + horizontal flip (eval transform if not augment)."""
        if not self.augment:
            return self.eval_transform()
        aug = [v2.RandomResizedCrop(self.image_size, antialias=True), v2.RandomHorizontalFlip()]
        return v2.Compose(aug + _to_tensor_tf(self.mean, self.std))

    def eval_transform(self) -> v2.Compose:
        """Resize the short side to ``resize_size`` then center-crop ``image_size``."""
        geo = [v2.Resize(self.resize_size, antialias=True), v2.CenterCrop(self.image_size)]
        return v2.Compose(geo + _to_tensor_tf(self.mean, self.std))

    # ------------------------------------------------------------------------- files
    @property
    def root(self) -> Path:
        return Path(self.data_dir) / self.root_subdir

    def _missing(self, cause: BaseException | None = None) -> FileNotFoundError:
        expected = ["train/<class>/<images>", f"val/<class>/<images> (or val/images/ + val/{ANNOTATIONS})"]
        err = missing_data_error(self.root, expected, download_option=False, cause=cause)
        return FileNotFoundError(
            f"{err} This dataset cannot be downloaded automatically (data.download does not apply): obtain it"
            f" yourself and set paths.data_dir / data.root_subdir so that {str(self.root)!r} holds it."
        )

    def _val_layout_is_annotations(self) -> bool:
        return (self.root / "val" / ANNOTATIONS).is_file() and (self.root / "val" / "images").is_dir()

    def prepare_data(self) -> None:
        """Check the ``train/`` and ``val/`` directories exist (nothing can be downloaded)."""
        if not (self.root / "train").is_dir() or not (self.root / "val").is_dir():
            raise self._missing()

    def setup(self, stage: str | None = None) -> None:
        """Index the image files once (idempotent): train/val subsets of ``train/``, test = ``val/``."""
        if self._train is not None:
            return
        self.prepare_data()
        try:
            full = ImageFolder(str(self.root / "train"), transform=self.train_transform())
            if self._val_layout_is_annotations():
                test: Dataset = TinyImageNetVal(self.root / "val", full.class_to_idx, self.eval_transform())
            else:
                test = FolderWithClasses(self.root / "val", full.class_to_idx, self.eval_transform())
        except (FileNotFoundError, OSError) as err:
            raise self._missing(err) from err
        if len(test) == 0:
            raise self._missing(FileNotFoundError(f"no images found under {self.root / 'val'}"))
        plain = copy.copy(full)  # same file index, evaluation transform
        plain.transform = self.eval_transform()
        keep, val = carve_split(len(full), self.val_fraction, self.seed)
        self._train = Subset(full, keep.tolist())
        self._val = Subset(plain, val.tolist())
        self._plain_train = Subset(plain, keep.tolist())
        self._test = test
        self._input_shape = (3, self.image_size, self.image_size)
        self._num_classes = len(full.classes)
        log.info(
            "%s: %d train / %d val / %d test images, %d classes",
            self.name, len(self._train), len(self._val), len(test), self._num_classes,
        )  # fmt: skip

    def _datasets(self) -> tuple[Subset, Subset, Dataset, Dataset]:
        if self._train is None or self._val is None or self._test is None or self._plain_train is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before requesting data")
        return self._train, self._val, self._test, self._plain_train

    # ------------------------------------------------------------------------- loaders
    def _loader(self, ds: Dataset, batch_size: int, **kw: Any) -> DataLoader:
        workers = self.num_workers
        return DataLoader(
            ds,
            batch_size=batch_size,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
            **kw,
        )

    def train_dataloader(self) -> DataLoader:
        train = self._datasets()[0]
        sampler = EpochRandomSampler(train, self.seed, self.current_epoch)
        gen = torch.Generator().manual_seed(self.seed)  # seeds the workers' augmentation RNG
        return self._loader(train, self.batch_size, sampler=sampler, drop_last=True, generator=gen)

    def val_dataloader(self) -> DataLoader:
        _, val, test, _ = self._datasets()
        return self._loader(val if len(val) else test, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._datasets()[2], self.eval_batch_size, shuffle=False)

    def score_batches(self, num_batches: int, batch_size: int | None = None) -> list[Batch]:
        """Seeded batches of training images with the evaluation transform (no augmentation), on CPU."""
        plain = self._datasets()[3]
        bs = int(batch_size or self.batch_size)
        need = min(num_batches * bs, len(plain))
        idx = epoch_permutation(len(plain), self.seed, _SCORE_STREAM)[:need].tolist()
        loader = DataLoader(Subset(plain, idx), batch_size=bs, shuffle=False, num_workers=self.num_workers)
        out: list[Batch] = []
        for x, y in loader:
            out.append(self.process_batch(x, y, train=False))
            if len(out) == num_batches:
                break
        return out


@DATASETS.register("imagenet")
class ImageNetDataModule(ImageFolderDataModule):
    """ImageNet-1k (ILSVRC 2012) from ``<data_dir>/imagenet/{train,val}``; input (3, 224, 224)."""

    name = "imagenet"


@DATASETS.register("tiny_imagenet")
class TinyImageNetDataModule(ImageFolderDataModule):
    """Tiny-ImageNet-200 from ``<data_dir>/tiny-imagenet-200/{train,val}`` (official val layout supported);
    input (3, 64, 64); augmentation: random crop 64 with padding 4 + horizontal flip."""

    name = "tiny_imagenet"
    mean = TINY_IMAGENET_MEAN
    std = TINY_IMAGENET_STD

    def __init__(
        self,
        root_subdir: str = "tiny-imagenet-200",
        image_size: int = 64,
        resize_size: int = 64,
        **common: Any,
    ) -> None:
        super().__init__(root_subdir=root_subdir, image_size=image_size, resize_size=resize_size, **common)

    def train_transform(self) -> v2.Compose:
        """Resize/center-crop to ``image_size`` (a no-op on the 64x64 originals), random crop pad 4, flip."""
        if not self.augment:
            return self.eval_transform()
        geo = [
            v2.Resize(self.resize_size, antialias=True),
            v2.CenterCrop(self.image_size),
            v2.RandomCrop(self.image_size, padding=4),
            v2.RandomHorizontalFlip(),
        ]
        return v2.Compose(geo + _to_tensor_tf(self.mean, self.std))
