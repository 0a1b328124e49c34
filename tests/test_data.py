"""Tests of prunelab.data: real on-disk formats written into tmp_path (no network), splits, batching, transforms."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.error import URLError

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DistributedSampler
from torchvision import datasets as tvd

import prunelab.data as pdata
from prunelab.data import DATASETS, BatchIndexDataset, batch_loader
from prunelab.data.transforms import (
    normalize,
    random_crop,
    random_hflip,
    random_resized_crop,
    resize_center_crop,
)

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"
NAMES = [
    "cifar10",
    "cifar100",
    "digits",
    "fashion_mnist",
    "imagenet",
    "mnist",
    "npz",
    "synthetic",
    "tiny_imagenet",
]
REAL_MNIST = Path("/work/shared/datasets/mnist-t10k")


# ----------------------------------------------------------------------------------------------- helpers
def load_data_yaml(name: str) -> Any:
    """``conf/data/<name>.yaml`` with its defaults list applied (the options it inherits from ``_base``)."""
    node = OmegaConf.load(CONF / f"{name}.yaml")
    parents = [load_data_yaml(p) for p in node.pop("defaults", []) if p != "_self_"]
    return OmegaConf.merge(*parents, node)


def compose(name: str, data_dir: Path, seed: int = 0, **overrides: Any) -> Any:
    """Compose ``conf/data/<name>.yaml`` under ``data`` next to ``seed`` / ``paths.data_dir``, instantiate it."""
    cfg = OmegaConf.create({"seed": seed, "paths": {"data_dir": str(data_dir)}})
    cfg.data = load_data_yaml(name)
    cfg = OmegaConf.merge(cfg, {"data": overrides})
    return instantiate(cfg.data)


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    """Write a uint8 array in the IDX format (magic 0x0000 0x08 ndim, big-endian int32 dims, raw bytes)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload = header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def make_mnist(
    root: Path, folder: str, n_train: int, n_test: int, gz: bool, seed: int = 0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, arr in arrays.items():
        write_idx(raw / name, arr, gz)
    return arrays


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def make_cifar(root: Path, cls: Any, n_per_file: int, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Write CIFAR python-pickle files (rows = R plane, G plane, B plane of 32x32) and point the class md5s at them.

    torchvision checks every file against hard-coded md5s of the real archives (``_check_integrity``), which fake
    files cannot match: the test replaces the class's md5 lists with the fake files' md5s (integrity check kept on).
    """
    rng = np.random.default_rng(1)
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    n_classes = 10 if cls is tvd.CIFAR10 else 100
    label_key = "labels" if cls is tvd.CIFAR10 else "fine_labels"
    written: dict[str, Any] = {}
    for name, _ in cls.train_list + cls.test_list:
        data = rng.integers(0, 256, (n_per_file, 3072), dtype=np.uint8)
        labels = rng.integers(0, n_classes, n_per_file).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, label_key: labels}, f)
        written[name] = (data, labels)
    with open(folder / cls.meta["filename"], "wb") as f:
        pickle.dump({cls.meta["key"]: [f"class{i}" for i in range(n_classes)]}, f)
    monkeypatch.setattr(cls, "train_list", [[n, md5(folder / n)] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[n, md5(folder / n)] for n, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(folder / cls.meta["filename"])})
    return written


def rows_as_set(x: torch.Tensor) -> list[bytes]:
    return sorted(r.numpy().tobytes() for r in x.reshape(len(x), -1))


def fake_trainer(training: bool, epoch: int = 0) -> SimpleNamespace:
    return SimpleNamespace(training=training, current_epoch=epoch)


def all_batches(dm: Any, loader: Any, training: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for b in loader:
        x, y = dm.process_batch(*b, train=training)
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


# ----------------------------------------------------------------------------------------------- registry & configs
def test_registry_and_yaml_configs_match(tmp_path: Path) -> None:
    assert DATASETS.names() == NAMES
    for name in NAMES:
        raw = OmegaConf.to_container(load_data_yaml(name), resolve=False)
        assert raw["data_dir"] == "${paths.data_dir}" and raw["seed"] == "${seed}"
        overrides = {"path": "x.npz"} if name == "npz" else {}
        dm = compose(name, tmp_path, seed=3, **overrides)
        assert type(dm) is DATASETS.get(name)
        assert isinstance(dm, pl.LightningDataModule)
        assert dm.seed == 3 and dm.data_dir == str(tmp_path) and dm.name == name
        assert dm.augment == (name in {"cifar10", "cifar100", "imagenet", "tiny_imagenet"})
    assert OmegaConf.is_missing(load_data_yaml("npz"), "path")
    with pytest.raises(RuntimeError, match="setup"):
        _ = compose("digits", tmp_path).input_shape


# ----------------------------------------------------------------------------------------------- batch-index dataset
def test_batch_index_dataset_epochs_and_drop_last() -> None:
    x, y = torch.arange(103).view(103, 1, 1, 1), torch.arange(103)
    ds = BatchIndexDataset(x, y, 10, shuffle=True, drop_last=True, seed=5)
    assert len(ds) == 10

    def epoch_order(d: BatchIndexDataset, e: int) -> torch.Tensor:
        d.set_epoch(e)
        batches = [d[i] for i in range(len(d))]
        assert all(bx.shape[0] == 10 and torch.equal(bx.view(-1), by) for bx, by in batches)
        return torch.cat([by for _, by in batches])

    e0, e1 = epoch_order(ds, 0), epoch_order(ds, 1)
    # no repeats, last partial batch dropped
    assert len(set(e0.tolist())) == 100 and len(set(e1.tolist())) == 100
    assert not torch.equal(e0, e1)
    again = BatchIndexDataset(x, y, 10, shuffle=True, drop_last=True, seed=5)
    assert torch.equal(epoch_order(again, 1), e1) and torch.equal(epoch_order(again, 0), e0)
    other_seed = BatchIndexDataset(x, y, 10, shuffle=True, drop_last=True, seed=6)
    assert not torch.equal(epoch_order(other_seed, 0), e0)
    with pytest.raises(IndexError):
        ds[10]
    ev = BatchIndexDataset(x, y, 10, shuffle=False, drop_last=False)
    assert len(ev) == 11 and torch.equal(torch.cat([ev[i][1] for i in range(11)]), y)
    # the loader yields whole batches (no collation)
    bx, by = next(iter(batch_loader(ev)))
    assert bx.shape == (10, 1, 1, 1) and torch.equal(by, y[:10])


def test_batch_index_dataset_distributed_sampler_disjoint() -> None:
    from lightning.pytorch.utilities.data import _update_dataloader

    x, y = torch.arange(120).view(120, 1, 1, 1), torch.arange(120)
    ds = BatchIndexDataset(x, y, 10, shuffle=True, drop_last=True, seed=0)
    ds.set_epoch(3)
    per_rank = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=False)
        loader = _update_dataloader(batch_loader(ds), sampler)  # what Lightning does under DDP
        assert isinstance(loader.sampler, DistributedSampler)
        per_rank.append(torch.cat([b[1] for b in loader]).tolist())
        assert sorted(sampler) == list(range(rank, 12, 2))
    assert len(per_rank[0]) == len(per_rank[1]) == 60
    assert set(per_rank[0]).isdisjoint(per_rank[1])
    assert set(per_rank[0]) | set(per_rank[1]) == set(range(120))


def test_training_order_follows_trainer_epoch(tmp_path: Path) -> None:
    dm = compose("synthetic", tmp_path, batch_size=32, num_train=256, num_test=64)
    dm.setup()
    dm.trainer = fake_trainer(True, epoch=0)
    ds = dm.train_dataloader().dataset
    first0 = ds[0][1].clone()
    dm.trainer = fake_trainer(True, epoch=1)
    first1 = ds[0][1].clone()
    dm.trainer = None
    dm.set_epoch(0)
    assert torch.equal(ds[0][1], first0) and not torch.equal(first0, first1)


# ----------------------------------------------------------------------------------------------- transforms
def test_random_crop_is_a_shifted_window_of_the_padded_image() -> None:
    torch.manual_seed(0)
    x = torch.rand(256, 2, 5, 6)
    p = 1
    out = random_crop(x, p, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    seen = set()
    for n in range(len(x)):
        hits = [
            (oy, ox)
            for oy in range(2 * p + 1)
            for ox in range(2 * p + 1)
            if torch.equal(out[n], padded[n, :, oy : oy + 5, ox : ox + 6])
        ]
        assert len(hits) == 1
        seen.add(hits[0])
    assert len(seen) == (2 * p + 1) ** 2  # every offset drawn (256 samples, 9 offsets)
    again = random_crop(x, p, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_random_hflip_flips_about_half_exactly() -> None:
    x = torch.rand(400, 1, 3, 4)
    out = random_hflip(x, generator=torch.Generator().manual_seed(1))
    flipped = torch.tensor([torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)])
    same = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert bool((flipped ^ same).all())
    assert 150 < int(flipped.sum()) < 250


def test_random_resized_crop_geometry() -> None:
    ramp_w = torch.arange(16.0).view(1, 1, 1, 16).expand(8, 1, 16, 16).contiguous()
    whole = random_resized_crop(ramp_w, (16, 16), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.allclose(whole, ramp_w, atol=1e-5)  # full-image crop at the same size = identity
    quarter = random_resized_crop(ramp_w, (16, 16), scale=(0.25, 0.25), ratio=(1.0, 1.0))
    steps = quarter[..., 2:14].diff(dim=-1)  # an 8-px-wide crop stretched to 16 px: 0.5 per output pixel
    assert torch.allclose(steps, torch.full_like(steps, 0.5), atol=1e-4)
    ramp_h = ramp_w.transpose(-1, -2)
    out = random_resized_crop(ramp_h, (10, 12), scale=(0.25, 0.25), ratio=(1.0, 1.0))
    assert out.shape == (8, 1, 10, 12)
    assert torch.allclose(out[..., 2:8, :].diff(dim=-2), torch.full((8, 1, 5, 12), 0.8), atol=1e-4)


def test_resize_center_crop_matches_torchvision_eval_geometry() -> None:
    x = torch.rand(2, 3, 256, 300)
    out = resize_center_crop(x, (224, 224))
    assert out.shape == (2, 3, 224, 224)
    # short side already 256: a pure center crop
    assert torch.allclose(out, x[..., 16:240, 38:262], atol=1e-5)


def test_normalize_per_channel() -> None:
    x = torch.ones(2, 3, 2, 2) * torch.tensor([0.5, 0.25, 1.0]).view(1, 3, 1, 1)
    out = normalize(x, (0.5, 0.0, 2.0), (1.0, 0.5, 4.0))
    assert torch.allclose(out[:, 0], torch.zeros(2, 2, 2))
    assert torch.allclose(out[:, 1], torch.full((2, 2, 2), 0.5))
    assert torch.allclose(out[:, 2], torch.full((2, 2, 2), -0.25))


# ----------------------------------------------------------------------------------------------- MNIST-like
@pytest.mark.parametrize(
    ("name", "folder", "mean", "std", "gz"),
    [("mnist", "MNIST", 0.1307, 0.3081, True), ("fashion_mnist", "FashionMNIST", 0.2860, 0.3530, False)],
)
def test_mnist_like_from_idx_files(
    tmp_path: Path, name: str, folder: str, mean: float, std: float, gz: bool
) -> None:
    arrays = make_mnist(tmp_path, folder, n_train=50, n_test=20, gz=gz)
    dm = compose(name, tmp_path, download=False, val_fraction=0.2, batch_size=8, eval_batch_size=6)
    dm.prepare_data()
    dm.prepare_data()
    dm.setup()
    dm.setup("fit")
    assert dm.input_shape == (1, 28, 28) and dm.num_classes == 10
    x_tr, y_tr = dm.split("train")
    x_va, y_va = dm.split("val")
    x_te, y_te = dm.split("test")
    assert (len(x_tr), len(x_va), len(x_te)) == (40, 10, 20)
    assert x_tr.dtype == torch.uint8 and x_tr.shape[1:] == (1, 28, 28)
    assert torch.equal(x_te[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]))
    assert torch.equal(y_te, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long())
    full = torch.from_numpy(arrays["train-images-idx3-ubyte"]).unsqueeze(1)
    assert rows_as_set(torch.cat([x_tr, x_va])) == rows_as_set(full)  # train + val partition the training set
    xb, yb = dm.on_after_batch_transfer(next(iter(dm.test_dataloader())), 0)
    assert xb.dtype == torch.float32 and yb.dtype == torch.int64 and xb.shape == (6, 1, 28, 28)
    assert torch.allclose(xb, (x_te[:6].float() / 255 - mean) / std)
    assert len(dm.train_dataloader()) == 5 and len(dm.val_dataloader()) == 2
    dm2 = compose(name, tmp_path, download=False, val_fraction=0.2)
    dm2.setup()
    assert torch.equal(dm2.split("val")[0], x_va)
    dm3 = compose(name, tmp_path, seed=1, download=False, val_fraction=0.2)
    dm3.setup()
    assert not torch.equal(dm3.split("val")[0], x_va)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "cifar100"])
def test_missing_files_raise_clear_error(tmp_path: Path, name: str) -> None:
    extra = {"source_dir": None} if "mnist" in name else {}  # an installed dataset package must not be used
    dm = compose(name, tmp_path / "nowhere", download=False, **extra)
    for call in (dm.prepare_data, dm.setup):
        with pytest.raises(FileNotFoundError) as info:
            call()
        msg = str(info.value)
        assert str(tmp_path / "nowhere") in msg and "data.download" in msg
        assert ("t10k-images-idx3-ubyte" in msg) if "mnist" in name else ("test" in msg and "meta" in msg)


def test_offline_download_is_reraised_as_file_not_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(*args: Any, **kwargs: Any) -> None:
        raise URLError("network is unreachable")

    monkeypatch.setattr(tvd.mnist, "download_and_extract_archive", offline)
    monkeypatch.setattr(tvd.cifar, "download_and_extract_archive", offline)
    for name in ("mnist", "cifar10"):
        dm = compose(name, tmp_path, download=True)
        with pytest.raises(FileNotFoundError, match="data.download") as info:
            dm.prepare_data()
        assert "network is unreachable" in str(info.value) or "Error downloading" in str(info.value)


def test_corrupted_cifar_file_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_cifar(tmp_path, tvd.CIFAR10, 4, monkeypatch)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "ab") as f:
        f.write(b"garbage")  # md5 no longer matches
    dm = compose("cifar10", tmp_path, download=False)
    dm.prepare_data()  # files are present: the cheap check passes; integrity is verified on load
    with pytest.raises(FileNotFoundError, match="corrupted"):
        dm.setup()


# ------------------------------------------------------------------------- official files from a local folder
def _gz_member(payload: bytes, mtime: int, name: str | None) -> bytes:
    """A gzip member as GNU gzip writes it (XFL 0, OS 3): with the file name (FLG.FNAME) or without it."""
    import zlib

    comp = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = comp.compress(payload) + comp.flush()
    flg, fname = (0x08, name.encode() + b"\0") if name else (0, b"")
    head = b"\x1f\x8b\x08" + bytes([flg]) + struct.pack("<I", mtime) + b"\x00\x03" + fname
    return head + body + struct.pack("<II", zlib.crc32(payload), len(payload) & 0xFFFFFFFF)


def official_folder(folder: Path, monkeypatch: pytest.MonkeyPatch, n_train: int = 30, n_test: int = 12,
                    debian: bool = False) -> dict[str, np.ndarray]:
    """Write the four Fashion-MNIST files as 'official' .gz files (name + mtime in the header) and point
    torchvision's md5s at them; with ``debian`` the folder holds them as Debian ships them (header without the
    name, mtime of the package build, same compressed data) and the module is told the original headers."""
    rng = np.random.default_rng(3)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    resources, headers = [], {}
    for i, (name, arr) in enumerate(arrays.items()):
        payload = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
        payload += arr.tobytes()
        mtime = 1503000000 + i
        official = _gz_member(payload, mtime, name)
        resources.append((f"{name}.gz", hashlib.md5(official).hexdigest()))
        headers[f"{name}.gz"] = mtime
        shipped = _gz_member(payload, 1591347949, None) if debian else official
        (folder / f"{name}.gz").write_bytes(shipped)
    monkeypatch.setattr(tvd.FashionMNIST, "resources", resources)
    monkeypatch.setattr(pdata.FashionMnistDataModule, "official_headers", headers if debian else {})
    return arrays


@pytest.mark.parametrize("debian", [False, True])
def test_fashion_mnist_from_a_local_copy_of_the_official_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, debian: bool
) -> None:
    arrays = official_folder(tmp_path / "official", monkeypatch, debian=debian)
    if debian:  # the shipped bytes differ from the official file: only the restored header makes the md5 match
        shipped = (tmp_path / "official" / "t10k-labels-idx1-ubyte.gz").read_bytes()
        assert hashlib.md5(shipped).hexdigest() != dict(tvd.FashionMNIST.resources)["t10k-labels-idx1-ubyte.gz"]

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("network used")

    monkeypatch.setattr(tvd.mnist, "download_and_extract_archive", no_network)
    dm = compose("fashion_mnist", tmp_path / "data", download=True, source_dir=str(tmp_path / "official"),
                 val_fraction=0.0)
    dm.prepare_data()
    dm.setup()
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(arrays)  # decompressed where torchvision reads them
    x_te, y_te = dm.split("test")
    assert torch.equal(x_te[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]))
    assert torch.equal(y_te, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long())
    x_tr, _ = dm.split("train")
    assert torch.equal(x_tr[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]))


def test_fashion_mnist_source_auto_detects_the_package_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    arrays = official_folder(tmp_path / "pkg", monkeypatch, debian=True)
    monkeypatch.setattr(pdata.FashionMnistDataModule, "system_dirs", (str(tmp_path / "absent"), str(tmp_path / "pkg")))
    dm = compose("fashion_mnist", tmp_path / "data", download=False)  # source_dir: auto (the default)
    assert dm.source() == tmp_path / "pkg"
    dm.setup()
    assert torch.equal(dm.split("test")[1], torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long())
    off = compose("fashion_mnist", tmp_path / "data2", download=False, source_dir=None)
    assert off.source() is None
    with pytest.raises(FileNotFoundError, match="data.download"):
        off.setup()


@pytest.mark.parametrize("debian", [False, True])
def test_fashion_mnist_source_wrong_md5_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, debian: bool
) -> None:
    official_folder(tmp_path / "src", monkeypatch, debian=debian)
    bad = tmp_path / "src" / "train-labels-idx1-ubyte.gz"
    data = bytearray(bad.read_bytes())
    data[-9] ^= 0xFF  # one byte of the compressed data (before the CRC/size trailer)
    bad.write_bytes(bytes(data))
    dm = compose("fashion_mnist", tmp_path / "data", download=False, source_dir=str(tmp_path / "src"))
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte\.gz has md5 [0-9a-f]{32}, expected [0-9a-f]{32}"):
        dm.setup()
    assert not (tmp_path / "data" / "FashionMNIST" / "raw" / "train-labels-idx1-ubyte").exists()


def test_fashion_mnist_source_missing_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    official_folder(tmp_path / "src", monkeypatch)
    (tmp_path / "src" / "t10k-images-idx3-ubyte.gz").unlink()
    dm = compose("fashion_mnist", tmp_path / "data", download=False, source_dir=str(tmp_path / "src"))
    with pytest.raises(FileNotFoundError, match=r"data.source_dir=.*missing t10k-images-idx3-ubyte\.gz"):
        dm.prepare_data()


def test_source_dir_does_not_change_the_run_id(make_cfg, tmp_path: Path) -> None:
    from prunelab.config import identity, stable_hash

    a = make_cfg("data=fashion_mnist", "data.source_dir=/somewhere", "logger=none", fast=False)
    b = make_cfg("data=fashion_mnist", "data.source_dir=null", "logger=none", fast=False)
    assert stable_hash(identity(a)) == stable_hash(identity(b))


PACKAGE_FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (PACKAGE_FMNIST / "t10k-labels-idx1-ubyte.gz").is_file(),
                    reason="dataset-fashion-mnist not installed")
def test_debian_package_files_have_torchvision_md5s_with_official_headers() -> None:
    """The installed package's files (headers normalised by Debian) are the official ones, byte for byte in the
    compressed data: restoring the recorded headers gives torchvision's md5 (the labels: cheap enough here)."""
    from prunelab.data.vision import _md5, _with_header

    cls = pdata.FashionMnistDataModule
    for name in ("train-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        data = (PACKAGE_FMNIST / name).read_bytes()
        restored = _with_header(data, cls.official_headers[name], name[:-3])
        assert _md5(restored) == dict(tvd.FashionMNIST.resources)[name]


@pytest.mark.skipif(not REAL_MNIST.is_dir(), reason="real MNIST t10k not available")
def test_real_mnist_t10k_through_idx_path(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    make_mnist(tmp_path, "MNIST", n_train=30, n_test=1, gz=True)
    for f in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(REAL_MNIST / f, raw / f)
        assert md5(raw / f) == dict(tvd.MNIST.resources)[f]
    dm = compose("mnist", tmp_path, download=False)
    dm.setup()
    x_te, y_te = dm.split("test")
    assert x_te.shape == (10000, 1, 28, 28) and x_te.dtype == torch.uint8
    assert y_te[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the well-known first t10k labels
    assert torch.bincount(y_te, minlength=10).min() >= 800
    assert abs(x_te.float().mean().item() / 255 - 0.1325) < 2e-3  # MNIST test-set pixel mean


# ----------------------------------------------------------------------------------------------- CIFAR
@pytest.mark.parametrize(
    ("name", "cls", "n_cls"), [("cifar10", tvd.CIFAR10, 10), ("cifar100", tvd.CIFAR100, 100)]
)
def test_cifar_from_pickle_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, cls: Any, n_cls: int
) -> None:
    written = make_cifar(tmp_path, cls, 6, monkeypatch)
    dm = compose(name, tmp_path, download=False, val_fraction=0.0, batch_size=4, eval_batch_size=5)
    dm.prepare_data()
    dm.setup()
    assert dm.input_shape == (3, 32, 32) and dm.num_classes == n_cls
    n_train = 6 * len(cls.train_list)
    x_tr, _ = dm.split("train")
    x_te, y_te = dm.split("test")
    assert len(x_tr) == n_train and len(dm.split("val")[0]) == 0 and len(x_te) == 6
    data, labels = written[cls.test_list[0][0]]
    assert torch.equal(x_te, torch.from_numpy(data).view(6, 3, 32, 32))  # R,G,B planes -> channels
    assert y_te.tolist() == labels
    # val_fraction=0: the validation loader is the test loader
    val_b = [b[1] for b in dm.val_dataloader()]
    test_b = [b[1] for b in dm.test_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(val_b, test_b)) and len(val_b) == len(test_b) == 2
    xb, _ = dm.process_batch(x_te[:2], y_te[:2], train=False)
    mean, std = torch.tensor(dm.mean).view(1, 3, 1, 1), torch.tensor(dm.std).view(1, 3, 1, 1)
    assert torch.allclose(xb, (x_te[:2].float() / 255 - mean) / std)
    expected_mean = (0.4914, 0.4822, 0.4465) if cls is tvd.CIFAR10 else (0.5071, 0.4865, 0.4409)
    assert dm.mean == pytest.approx(expected_mean)


def test_cifar_augmentation_only_when_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_cifar(tmp_path, tvd.CIFAR10, 8, monkeypatch)
    dm = compose("cifar10", tmp_path, download=False, batch_size=16)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    x_raw = batch[0]
    dm.trainer = fake_trainer(training=False)
    ev1, _ = dm.on_after_batch_transfer(batch, 0)
    ev2, _ = dm.on_after_batch_transfer(batch, 0)
    plain = normalize(x_raw.float() / 255, dm.mean, dm.std)
    assert torch.equal(ev1, ev2) and torch.allclose(ev1, plain)
    dm.trainer = fake_trainer(training=True)
    tr, yb = dm.on_after_batch_transfer(batch, 0)
    assert tr.shape == ev1.shape and yb.dtype == torch.int64
    assert not torch.allclose(tr, ev1)
    # each augmented sample is a 32x32 window of the zero-padded image (pad 4), possibly flipped
    padded = torch.nn.functional.pad(x_raw.float() / 255, (4, 4, 4, 4))
    for n in range(len(tr)):
        raw_aug = tr[n] * torch.tensor(dm.std).view(3, 1, 1) + torch.tensor(dm.mean).view(3, 1, 1)
        found = any(
            torch.allclose(cand, raw_aug, atol=1e-5)
            for oy in range(9)
            for ox in range(9)
            for cand in (
                padded[n, :, oy : oy + 32, ox : ox + 32],
                padded[n, :, oy : oy + 32, ox : ox + 32].flip(-1),
            )
        )
        assert found
    # score batches never augment
    sb = dm.score_batches(1, 4)[0][0]
    assert sb.shape == (4, 3, 32, 32)


# ----------------------------------------------------------------------------------------------- image folders
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def _img(colour: tuple[int, int, int], size: tuple[int, int], grey: bool = False) -> Image.Image:
    img = Image.new("RGB", size, colour)
    return img.convert("L").convert("RGB") if grey else img


def test_imagenet_folder_layout(tmp_path: Path) -> None:
    root = tmp_path / "imagenet"
    for c, colour in enumerate(COLOURS):
        for i in range(4):
            d = root / "train" / f"n0{c}"
            d.mkdir(parents=True, exist_ok=True)
            _img(colour, (20 + 3 * i, 30)).save(d / f"img{i}.png")
        for i in range(2):
            d = root / "val" / f"n0{c}"
            d.mkdir(parents=True, exist_ok=True)
            _img(colour, (40, 25)).save(d / f"v{i}.png")
    dm = compose("imagenet", tmp_path, batch_size=4, eval_batch_size=5, val_fraction=0.25, num_workers=0)
    dm.prepare_data()
    dm.setup()
    dm.setup()
    assert dm.input_shape == (3, 224, 224) and dm.num_classes == 3
    assert len(dm.train_dataloader()) == 9 // 4  # drop_last on 9 training images
    assert len(dm.val_dataloader().dataset) == 3 and len(dm.test_dataloader().dataset) == 6
    xs, ys = all_batches(dm, dm.test_dataloader())
    assert xs.shape == (6, 3, 224, 224) and xs.dtype == torch.float32 and ys.dtype == torch.int64
    unnorm = xs * torch.tensor(dm.std).view(1, 3, 1, 1) + torch.tensor(dm.mean).view(1, 3, 1, 1)
    assert torch.equal(unnorm.mean(dim=(2, 3)).argmax(1), ys)  # solid colour = class index
    assert torch.allclose(all_batches(dm, dm.test_dataloader())[0], xs)  # eval is deterministic
    xt, yt = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert xt.shape == (4, 3, 224, 224)
    s1, s2 = dm.score_batches(2, 3), dm.score_batches(2, 3)
    assert [b[0].shape for b in s1] == [(3, 3, 224, 224)] * 2
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(s1, s2))


def test_tiny_imagenet_official_val_layout(tmp_path: Path) -> None:
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n01443537", "n01629819", "n01641577"]
    for c, w in enumerate(wnids):
        d = root / "train" / w / "images"
        d.mkdir(parents=True)
        for i in range(3):
            _img(COLOURS[c], (64, 64)).save(d / f"{w}_{i}.JPEG")
        (root / "train" / w / f"{w}_boxes.txt").write_text("ignored\n")
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    for i, c in enumerate([2, 0, 1, 1, 2]):
        _img(COLOURS[c], (64, 64), grey=False).save(root / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{wnids[c]}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    dm = compose("tiny_imagenet", tmp_path, batch_size=2, eval_batch_size=4, val_fraction=0.2, num_workers=0)
    dm.setup()
    assert dm.input_shape == (3, 64, 64) and dm.num_classes == 3
    xs, ys = all_batches(dm, dm.test_dataloader())
    assert ys.tolist() == [2, 0, 1, 1, 2] and xs.shape == (5, 3, 64, 64)
    unnorm = xs * torch.tensor(dm.std).view(1, 3, 1, 1) + torch.tensor(dm.mean).view(1, 3, 1, 1)
    assert torch.equal(unnorm.mean(dim=(2, 3)).argmax(1), ys)
    xt, _ = next(iter(dm.train_dataloader()))
    assert xt.shape == (2, 3, 64, 64)


def test_image_folder_missing_dirs(tmp_path: Path) -> None:
    dm = compose("imagenet", tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        dm.setup()
    assert str(tmp_path / "imagenet") in str(info.value) and "train/" in str(info.value)
    assert "data.download" in str(info.value)
    (tmp_path / "imagenet" / "train" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "imagenet" / "train" / "a" / "x.png")
    (tmp_path / "imagenet" / "val" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images found"):
        compose("imagenet", tmp_path).setup()


# ----------------------------------------------------------------------------------------------- npz
def test_npz_uint8_nhw_carves_test_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (50, 6, 7), dtype=np.uint8)
    y = rng.integers(0, 4, 50)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    dm = compose("npz", tmp_path, path="d.npz", val_fraction=0.1, batch_size=8)  # relative: under data_dir
    dm.setup()
    assert dm.input_shape == (1, 6, 7) and dm.num_classes == int(y.max()) + 1
    sizes = [len(dm.split(s)[0]) for s in ("train", "val", "test")]
    assert sizes == [36, 4, 10]
    allx = torch.cat([dm.split(s)[0] for s in ("train", "val", "test")])
    assert rows_as_set(allx) == rows_as_set(torch.from_numpy(x).unsqueeze(1))
    xtr, _ = all_batches(dm, batch_loader(dm.eval_dataset("train")))
    # normalised with the training split's own statistics
    assert abs(xtr.mean().item()) < 1e-5 and abs(xtr.std(unbiased=False).item() - 1) < 1e-4


def test_npz_float_nchw_with_test_arrays(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 3, 5, 5)).astype(np.float32)
    xt = rng.normal(size=(7, 3, 5, 5)).astype(np.float64)
    np.savez(tmp_path / "f.npz", x=x, y=np.arange(30) % 3, x_test=xt, y_test=np.arange(7) % 3)
    np.savez(tmp_path / "g.npz", x=x, y=np.arange(30) % 3, x_test=xt[:, :2], y_test=np.arange(7) % 3)
    with pytest.raises(ValueError, match="x_test"):  # 2 test channels vs 3 training channels
        compose("npz", tmp_path, path=str(tmp_path / "g.npz")).setup()
    dm = compose("npz", tmp_path, path=str(tmp_path / "f.npz"), num_classes=5, val_fraction=0.0)
    dm.setup()
    assert dm.num_classes == 5 and dm.input_shape == (3, 5, 5)
    x_te, y_te = dm.split("test")
    assert torch.allclose(x_te, torch.from_numpy(xt).float()) and y_te.tolist() == (np.arange(7) % 3).tolist()


@pytest.mark.parametrize(
    ("arrays", "error", "match"),
    [
        ({"x": np.zeros((4, 5), np.uint8), "y": np.zeros(4, int)}, ValueError, "'x'"),
        ({"x": np.zeros((4, 2, 2), np.int32), "y": np.zeros(4, int)}, TypeError, "'x'.*dtype"),
        ({"x": np.zeros((4, 2, 2), np.uint8), "y": np.zeros(3, int)}, ValueError, "'y'"),
        ({"x": np.zeros((4, 2, 2), np.uint8), "y": np.full(4, 0.5)}, TypeError, "'y'"),
        ({"x": np.zeros((4, 2, 2), np.uint8)}, KeyError, "'y'"),
        ({"x": np.zeros((4, 2, 2), np.uint8), "y": np.zeros(4, int), "x_test": np.zeros((2, 2, 2), np.uint8)},
         KeyError, "y_test"),
        ({"x": np.zeros((4, 2, 2), np.uint8), "y": np.array([0, 1, 5, 1])}, ValueError, "num_classes"),
    ],
)  # fmt: skip
def test_npz_bad_inputs(tmp_path: Path, arrays: dict[str, np.ndarray], error: type, match: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    dm = compose("npz", tmp_path, path=str(tmp_path / "bad.npz"), num_classes=3)
    with pytest.raises(error, match=match) as info:
        dm.setup()
    assert "bad.npz" in str(info.value)


def test_npz_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        compose("npz", tmp_path, path="nope.npz").prepare_data()


# ----------------------------------------------------------------------------------------------- digits
def test_digits_splits_and_normalisation(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    dm = compose("digits", tmp_path)
    dm.setup()
    assert dm.input_shape == (1, 8, 8) and dm.num_classes == 10
    sizes = [len(dm.split(s)[0]) for s in ("train", "val", "test")]
    assert sizes[2] == 359 and sum(sizes) == 1797 and sizes[1] == round(1438 * 0.1)
    bunch = load_digits()
    allx = torch.cat([dm.split(s)[0] for s in ("train", "val", "test")])
    assert rows_as_set(allx) == rows_as_set(torch.from_numpy(bunch.images).to(torch.uint8).unsqueeze(1))
    assert int(allx.max()) == 16
    xtr, _ = all_batches(dm, batch_loader(dm.eval_dataset("train")))
    assert abs(xtr.mean().item()) < 1e-5 and abs(xtr.std(unbiased=False).item() - 1) < 1e-4
    x0 = dm.split("train")[0][:3]
    assert torch.allclose(dm.process_batch(x0, torch.zeros(3), False)[0], (x0 / 16 - dm.mean[0]) / dm.std[0])
    again = compose("digits", tmp_path)
    again.setup()
    assert torch.equal(again.split("test")[1], dm.split("test")[1])
    other = compose("digits", tmp_path, seed=1)
    other.setup()
    assert not torch.equal(other.split("test")[0], dm.split("test")[0])


# ----------------------------------------------------------------------------------------------- synthetic
def _nearest_mean_accuracy(dm: Any) -> float:
    x_tr, y_tr = all_batches(dm, batch_loader(dm.eval_dataset("train")))
    x_te, y_te = all_batches(dm, dm.test_dataloader())
    means = torch.stack([x_tr[y_tr == k].mean(0).flatten() for k in range(dm.num_classes)])
    pred = torch.cdist(x_te.flatten(1), means).argmin(1)
    return (pred == y_te).float().mean().item()


def test_synthetic_determinism_and_learnability(tmp_path: Path) -> None:
    a = compose("synthetic", tmp_path, seed=7)
    b = compose("synthetic", tmp_path, seed=7)
    c = compose("synthetic", tmp_path, seed=8)
    for dm in (a, b, c):
        dm.setup()
    assert a.input_shape == (1, 28, 28) and a.num_classes == 10
    for s in ("train", "val", "test"):
        assert torch.equal(a.split(s)[0], b.split(s)[0]) and torch.equal(a.split(s)[1], b.split(s)[1])
    assert not torch.equal(a.split("test")[0], c.split("test")[0])
    assert torch.bincount(a.split("test")[1]).tolist() == [52] * 2 + [51] * 8  # balanced 512 = 10 classes
    assert _nearest_mean_accuracy(a) > 0.9  # chance = 0.1
    blind = compose("synthetic", tmp_path, signal=0.0, num_train=1000, num_test=1000, input_shape=[1, 8, 8])
    blind.setup()
    assert _nearest_mean_accuracy(blind) < 0.2  # no signal -> chance level


def test_synthetic_logistic_regression_trains_through_loaders(tmp_path: Path) -> None:
    torch.manual_seed(0)
    dm = compose("synthetic", tmp_path, batch_size=64, input_shape=[1, 12, 12], noise=2.0)
    dm.setup()
    model = torch.nn.Linear(144, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    dm.trainer = fake_trainer(training=True)
    for epoch in range(3):
        dm.trainer.current_epoch = epoch
        for batch in dm.train_dataloader():
            x, y = dm.on_after_batch_transfer(batch, 0)
            loss = torch.nn.functional.cross_entropy(model(x.flatten(1)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    dm.trainer = fake_trainer(training=False)
    x_te, y_te = all_batches(dm, dm.test_dataloader())
    acc = (model(x_te.flatten(1)).argmax(1) == y_te).float().mean().item()
    assert acc > 0.6


# ----------------------------------------------------------------------------------------------- score batches / device
def test_score_batches_deterministic_from_train_split(tmp_path: Path) -> None:
    dm = compose("synthetic", tmp_path, augment=True, num_train=100, num_test=20, input_shape=[1, 4, 4])
    dm.setup()
    s1 = dm.score_batches(3, 16)
    dm.to_device("cpu")
    s2 = compose("synthetic", tmp_path, augment=True, num_train=100, num_test=20, input_shape=[1, 4, 4])
    s2.setup()
    s2 = s2.score_batches(3, 16)
    assert len(s1) == 3 and all(b[0].shape == (16, 1, 4, 4) and b[0].device.type == "cpu" for b in s1)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(s1, s2))
    x_tr, y_tr = dm.split("train")
    train_norm = dm.process_batch(x_tr, y_tr, train=False)[0]
    rows = {r.numpy().tobytes() for r in train_norm.flatten(1)}
    # every scored sample is a (non-augmented) training sample
    assert all(r.numpy().tobytes() in rows for b in s1 for r in b[0].flatten(1))
    many = dm.score_batches(10, 16)  # 160 > 90 training samples: wraps around
    assert len(many) == 10 and torch.cat([b[1] for b in many]).shape == (160,)
    assert dm.score_batches(2)[0][0].shape[0] == dm.batch_size


def test_lightning_trainer_calls_the_batch_hook(tmp_path: Path) -> None:
    x = np.random.default_rng(0).integers(0, 256, (40, 1, 6, 6), dtype=np.uint8)
    np.savez(tmp_path / "t.npz", x=x, y=np.arange(40) % 2)
    dm = compose("npz", tmp_path, path="t.npz", batch_size=8, augment=True, hflip=True, crop_padding=1)
    seen: list[tuple[str, torch.dtype, tuple[int, ...]]] = []

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(36, 2)

        def training_step(self, batch: Any, idx: int) -> torch.Tensor:
            seen.append(("train", batch[0].dtype, tuple(batch[0].shape)))
            return torch.nn.functional.cross_entropy(self.lin(batch[0].flatten(1)), batch[1])

        def validation_step(self, batch: Any, idx: int) -> None:
            seen.append(("val", batch[0].dtype, tuple(batch[0].shape)))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(Tiny(), datamodule=dm)
    assert {s[0] for s in seen} == {"train", "val"}
    assert all(dtype == torch.float32 for _, dtype, _ in seen)
    assert [s[2] for s in seen if s[0] == "train"] == [(8, 1, 6, 6)] * (len(dm.split("train")[0]) // 8)


def test_public_api_exports() -> None:
    for name in pdata.__all__:
        assert hasattr(pdata, name)


@pytest.mark.parametrize("method,option,new_value", [
    ("l2_norm", "residual_gates", "block_output"),
    ("bmrs_n", "zero_pruned", "true"),
    ("bmrs_l2", "l2_epoch_threshold", "0.5"),
])
def test_an_option_added_at_its_old_behaviour_keeps_the_run_id(make_cfg, method, option, new_value) -> None:
    """Options that came after runs existed (method.residual_gates, BMRS's zero_pruned and l2_epoch_threshold):
    at the value that computes what those runs did, the option is out of the identity, so their folders are
    found again; another value names another run."""
    from omegaconf import open_dict

    from prunelab.config import identity, stable_hash

    base = [f"method={method}", "logger=none"] + (["schedule=oneshot"] if method == "l2_norm" else
                                                  ["schedule=bayesian"])
    base += ["method.amount=0.5"] if method == "bmrs_l2" else []
    cfg = make_cfg(*base, fast=False)
    before = cfg.copy()
    with open_dict(before):
        del before.method[option]  # the config as it was before the option existed
    assert stable_hash(identity(cfg)) == stable_hash(identity(before))
    other = make_cfg(*base, f"method.{option}={new_value}", fast=False)
    assert stable_hash(identity(other)) != stable_hash(identity(cfg))
