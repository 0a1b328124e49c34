"""The dense-model cache, debug runs, determinism and the run-folder lock: what makes a reused artefact the one
this run would have computed.

The dense cache (``<paths.cache_dir>/dense/<key>/``) holds pretrained models shared by every run whose
:func:`dense_identity` is the same: ``key.json`` (the full identity and its hash, written first), ``init.pt``,
``model.pt``, optional ``rewind_epoch<k>.pt`` and ``metrics.json`` (written last: the entry is complete).
A debug run (:func:`debug_mode`) keeps its dense model in ``<run_dir>/cache/`` instead: a model trained on a
few batches must never be reused by a real run, and a debug run must not pick up a real run's model either
(the debug options would then not test pretraining).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch import nn

from prunelab.config import identity, stable_hash
from prunelab.utils.finite import check_finite_model
from prunelab.utils.io import (
    atomic_torch_save,
    atomic_write_json,
    check_writable,
    clean_stale_tmp,
    file_fingerprint,
    file_lock,
    is_writable,
    load_torch,
    move_aside,
    read_record,
    try_lock,
)

log = logging.getLogger(__name__)

# Bump when a change of prunelab's training code changes the dense weights a configuration produces: every
# earlier cache entry is then ignored (it lives under another key).
DENSE_KEY_VERSION = 2

# Trainer options that cannot change the dense weights (see dense_identity for the argument); every other
# trainer option is part of the key, including ones prunelab does not know of (a new option costs at most a
# needless retraining, never a wrong reuse).
TRAINER_NOT_IN_KEY = frozenset({
    "enable_progress_bar", "enable_model_summary", "log_every_n_steps", "logger", "callbacks",
    "default_root_dir", "enable_checkpointing", "profiler", "num_sanity_val_steps",
    "devices", "num_nodes",  # replaced by world_size (and global_batch)
})

# Trainer options that cut training or evaluation short (max_time: at a wall-clock moment, so never
# reproducible): a run with any of them set is a debug run.
DEBUG_TRAINER_OPTIONS = ("fast_dev_run", "overfit_batches", "limit_train_batches", "limit_val_batches",
                         "limit_test_batches", "limit_predict_batches", "max_time")


# debug runs -------------------------------------------------------------------------------------------------
def _limits(key: str, value: Any) -> bool:
    if value is None or value is False:
        return False
    if key.startswith("limit_"):  # int: that many batches; float: that fraction (1.0 = everything)
        return not (isinstance(value, float) and value == 1.0)
    if key == "overfit_batches":
        return value != 0
    return bool(value)


def debug_mode(cfg: DictConfig) -> str | None:
    """The debug option of a run: the ``debug`` group's option (``fdr``, ``limit``, ``overfit``, ``profiler``,
    ``default``), else the first trainer option that cuts training short (``trainer.limit_train_batches=2``),
    else None (a full run)."""
    if cfg.get("debug"):
        return str(cfg.debug)
    trainer = cfg.get("trainer") or {}
    for key in DEBUG_TRAINER_OPTIONS:
        value = trainer.get(key)
        if _limits(key, value):
            return f"trainer.{key}={value}"
    return None


# determinism ------------------------------------------------------------------------------------------------
def configure_determinism(cfg: DictConfig) -> dict[str, Any]:
    """Apply ``threads`` (torch's intra-op threads for the whole run) and, with ``trainer.deterministic``,
    deterministic algorithms from the start (Lightning turns them on only when a Trainer is built: after data
    statistics and, for ``schedule=at_init``, after scoring). Returns the record results.json keeps.

    Why threads: CPU kernels split reductions (sums, matrix products) by thread, so the same run with 1 or 2
    threads differs in the last bits (measured 9e-8 on LeNet weights); ``trainer.deterministic=true
    threads=<n>`` makes a run bit-identical to any other run with the same options, in any process."""
    threads = cfg.get("threads")
    if threads is not None:
        if int(threads) < 1:
            raise ValueError(f"threads={threads}: must be >= 1, or null for torch's default")
        torch.set_num_threads(int(threads))
    det = (cfg.get("trainer") or {}).get("deterministic")
    if det is True or det == "warn":
        torch.use_deterministic_algorithms(True, warn_only=det == "warn")
        if torch.cuda.is_available():
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return determinism_record(cfg)


def determinism_record(cfg: DictConfig) -> dict[str, Any]:
    """The settings that decide the last bits of a run (results.json ``determinism``)."""
    trainer = cfg.get("trainer") or {}
    return {
        "torch_threads": torch.get_num_threads(),
        "threads_option": cfg.get("threads"),
        "deterministic": trainer.get("deterministic"),
        "benchmark": trainer.get("benchmark"),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }


def _deterministic(cfg: DictConfig) -> bool:
    det = (cfg.get("trainer") or {}).get("deterministic")
    return det is True or det == "warn"


# the dense key ----------------------------------------------------------------------------------------------
def _accelerator(name: Any) -> str:
    name = str(name or "auto").lower()
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if cuda else ("mps" if mps else "cpu")
    if name == "gpu":
        return "cuda" if cuda or not mps else "mps"
    return name


def world_size(trainer: dict) -> int:
    """Processes a Trainer with these options trains on (devices per node x nodes), as Lightning counts them."""
    accel = _accelerator(trainer.get("accelerator"))
    available = {"cuda": torch.cuda.device_count(), "cpu": os.cpu_count() or 1}.get(accel, 1)
    devices = trainer.get("devices", "auto")
    if isinstance(devices, (list, tuple)):
        n = len(devices)
    elif isinstance(devices, int):
        n = available if devices == -1 else devices
    else:
        text = str(devices).strip()
        if text == "auto":
            n = available if accel == "cuda" else 1
        elif text == "-1":
            n = available
        elif "," in text:
            n = len([d for d in text.split(",") if d.strip()])
        else:
            n = int(text)
    return max(1, n) * max(1, int(trainer.get("num_nodes") or 1))


def dense_identity(cfg: DictConfig, data_files: Any = None) -> dict[str, Any]:
    """Everything that changes the dense pretrained weights: the dense cache is keyed by its hash.

    In the key:
    - ``data`` (every option but ``data_dir``, ``num_workers``, ``download``, ``source_dir`` and
      ``steps_per_call``: where the files are, how they are read and how many batches one Lightning call takes
      do not change them): the dataset, its split (``val_fraction``, ``test_fraction``, the
      data seed), batch size and augmentation; and ``data_files``, a fingerprint of the data file when the
      data module has one (``data=npz``: size and SHA-256 of the archive, so a replaced file retrains).
    - ``model``, with the size and SHA-256 of ``model.weights`` when it starts from a file; ``pretrain``
      (epochs, optimiser, scheduler); ``seed``.
    - ``trainer``: every option except :data:`TRAINER_NOT_IN_KEY` (progress bar, model summary, logging
      interval, loggers, callbacks list, root dir, checkpointing switch, profiler, sanity validation steps:
      output and bookkeeping only; pretraining selects no checkpoint by validation). So ``precision``,
      ``accumulate_grad_batches``, ``limit_*_batches``, ``overfit_batches``, ``fast_dev_run``, ``max_steps``,
      ``sync_batchnorm`` (BN statistics across ranks), ``strategy``, ``deterministic`` and ``benchmark``
      (kernel choice) are in, with ``accelerator`` resolved (``auto`` -> ``cuda``/``cpu``) and ``devices`` x
      ``num_nodes`` replaced by ``world_size``: which GPU ids train does not matter, how many ranks split a
      batch does (gradient reduction, per-rank BN statistics).
    - ``global_batch`` = world size x ``data.batch_size``: the batch one optimiser step sees.
    - ``version`` (:data:`DENSE_KEY_VERSION`): changes of prunelab's training code.
    - ``torch_threads``, only in deterministic mode (``trainer.deterministic``): there the user asked for
      bit-identical results, which hold only at one thread count (``threads`` fixes it for every process).

    Out of the key, recorded in ``key.json`` for provenance: the torch thread count in default mode, the
    torch/CUDA versions and the GPU model. They change the weights only by floating-point rounding
    (reduction order; measured 9e-8 between 1 and 2 threads on LeNet-300-100), far below run-to-run seed
    variation; keying on them would give every joblib worker (1 thread), CLI run (all cores) and machine of
    a sweep its own dense model, i.e. a different pretrained network per job of one comparison. The
    tolerance: a cached dense model equals the one this run would train up to that rounding, unless
    ``trainer.deterministic=true`` (then bit-identical, at a fixed ``threads``).
    """
    ident = identity(cfg, keys=["data", "model", "pretrain", "seed"])
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True) if OmegaConf.is_config(cfg.trainer) \
        else dict(cfg.trainer)
    world = world_size(trainer)
    key_trainer = {k: v for k, v in trainer.items() if k not in TRAINER_NOT_IN_KEY}
    key_trainer["accelerator"] = _accelerator(trainer.get("accelerator"))
    key_trainer["world_size"] = world
    ident["trainer"] = key_trainer
    ident["global_batch"] = world * int(cfg.data.get("batch_size", 1))
    ident["version"] = DENSE_KEY_VERSION
    if data_files is not None:
        ident["data_files"] = data_files
    weights = cfg.model.get("weights") if OmegaConf.is_dict(cfg.model) else None
    if weights and Path(str(weights)).is_file():
        ident["model_weights_file"] = file_fingerprint(Path(str(weights)))
    if _deterministic(cfg):
        ident["torch_threads"] = torch.get_num_threads()
    return ident


def data_fingerprint(datamodule: Any) -> Any:
    """The data module's file fingerprint (its ``fingerprint()``, e.g. ``data=npz``) for :func:`dense_identity`;
    ``None`` for a data module without one."""
    fingerprint = getattr(datamodule, "fingerprint", None)
    return fingerprint() if callable(fingerprint) else None


def plain(obj: Any) -> Any:
    """``obj`` as the JSON it is stored as (tuples -> lists, non-finite floats and other objects -> strings), so
    that a recorded identity compares equal to the one computed now."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return repr(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def dense_key(ident: dict) -> str:
    return stable_hash(plain(ident), 16)


def _provenance() -> dict[str, Any]:
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "host": socket.gethostname(), "pid": os.getpid(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{prefix}{k}.")
        return out
    return [] if json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str) \
        else [f"{prefix[:-1]}: cached {a!r}, this run {b!r}"]


class DenseCacheMismatch(ValueError):
    """A cache folder whose recorded key is not this run's."""


# the cache entry --------------------------------------------------------------------------------------------
PRETRAIN_RECORD_KEYS = ("metrics.pretrain/test/acc", "epochs")


class DenseEntry:
    """One dense-cache folder ``<root>/dense/<key>/``: checks, loads and fills it.

    Reads take no lock (every file is written atomically, ``metrics.json`` last, so a complete entry never
    changes): a read-only cache (a shared, immutable copy) is used as it is. Filling it, and moving a
    damaged file aside, happens under ``<root>/locks/<key>.lock``."""

    def __init__(self, root: Path, ident: dict):
        self.root = Path(root)
        self.ident = plain(ident)
        self.key = dense_key(self.ident)
        self.dir = self.root / "dense" / self.key
        self.model_file, self.init_file = self.dir / "model.pt", self.dir / "init.pt"
        self.record_file, self.key_file = self.dir / "metrics.json", self.dir / "key.json"

    def rewind_file(self, epoch: int | None) -> Path | None:
        return self.dir / f"rewind_epoch{epoch}.pt" if epoch else None

    def writable(self) -> bool:
        d = self.dir if self.dir.exists() else self.root
        while not d.exists():
            d = d.parent
        return is_writable(d)

    def lock(self):
        return file_lock(self.root / "locks" / f"{self.key}.lock")

    def check_key(self) -> bool:
        """True when ``key.json`` records this run's identity; False when it is missing or unreadable (the
        entry is then incomplete); raises :class:`DenseCacheMismatch` when it records another one."""
        rec = read_record(self.key_file, ("identity", "key"), what="dense cache key")
        if rec is None:
            return False
        if rec["identity"] != self.ident or rec["key"] != self.key:
            diff = _differences(rec["identity"], self.ident)
            raise DenseCacheMismatch(
                f"dense cache folder {self.dir} records another configuration than this run's (key "
                f"{rec['key']}; differs in: {'; '.join(diff[:5]) or 'the key hash'}): it was copied or renamed "
                "into place, or written by another prunelab version. It is not used: delete that folder (this "
                "run then pretrains and fills it) or point paths.cache_dir elsewhere.")
        return True

    def load(self, model: nn.Module, rewind_epoch: int | None, move: bool) -> tuple[dict, dict] | None:
        """``(init_state, record)`` with ``model`` loaded, when the entry is complete and intact; else None.
        With ``move`` (under the lock) damaged files are moved aside, so that the caller retrains them."""
        if not self.record_file.exists() or not self.check_key():
            return None
        record = read_record(self.record_file, PRETRAIN_RECORD_KEYS, what="dense cache record")
        if record is None:
            return None
        state = load_torch(self.model_file, move=move, what="dense model")
        init = load_torch(self.init_file, move=move, what="dense initial weights")
        rewind = self.rewind_file(rewind_epoch)
        if state is None or init is None or (rewind is not None and
                                             load_torch(rewind, move=move, what="rewind weights") is None):
            return None
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError) as e:  # right key, other architecture: prunelab code changed
            log.warning("dense cache %s does not fit the model (%s)", self.model_file, str(e).splitlines()[0])
            if move:
                move_aside(self.model_file, "does not fit the model")
            return None
        return init, record

    def begin(self, init_state: dict) -> None:
        """Start filling the entry (under the lock): clean up leftovers of killed writers, record the key
        and the initial weights."""
        clean_stale_tmp(self.dir)
        with contextlib.suppress(FileNotFoundError):
            self.record_file.unlink()  # the entry is incomplete until the new record is written
        atomic_write_json({"key": self.key, "identity": self.ident, "provenance": _provenance()}, self.key_file)
        atomic_torch_save(init_state, self.init_file)

    def finish(self, model: nn.Module, record: dict, advice: str) -> None:
        """Store the trained model and then its record (the entry is complete); a non-finite model is
        refused (it would be reused by every later run of this key)."""
        check_finite_model(model, "pretrain: the trained dense model", advice)
        atomic_torch_save(model.state_dict(), self.model_file)
        atomic_write_json(record, self.record_file)


def cache_root(cfg: DictConfig, run_dir: Path) -> Path:
    """Where this run's dense cache lives: ``<run_dir>/cache`` for a debug run (:func:`debug_mode`), else
    ``paths.cache_dir``, created if needed. An existing ``paths.cache_dir`` that cannot be written is
    accepted (read-only shared copies): a run that would have to fill it fails in :func:`pretrain` with a
    message, before training."""
    if debug_mode(cfg) is not None:
        return Path(run_dir) / "cache"
    d = Path(cfg.paths.cache_dir)
    if d.is_dir() and not is_writable(d):
        log.info("paths.cache_dir=%s is read-only: only complete dense-cache entries can be used", d)
        return d
    return check_writable(d, "paths.cache_dir")


# the run-folder lock ----------------------------------------------------------------------------------------
_HELD: dict[str, Any] = {}
RUN_LOCK = ".prunelab.lock"
RUN_OWNER = ".prunelab.owner.json"


class RunDirBusy(ValueError):
    """Another process works in this run folder."""


def hold_run_dir(run_dir: Path) -> None:
    """Lock ``run_dir`` for this process until :func:`release_run_dirs`: a second process started on the same
    folder (the same command in two shells, a re-run while an earlier sweep's workers still run) is refused
    at once with a message naming the holder, rather than waiting: the two would otherwise train the same
    stages at the same time, and a queue behind an orphaned worker could wait for hours. Then removes the
    temporary files killed writers left there. Only global rank 0 locks (DDP ranks share the folder)."""
    if getattr(rank_zero_only, "rank", 0) != 0:
        return
    key = str(Path(run_dir).resolve())
    if key in _HELD:
        return
    lock = try_lock(Path(run_dir) / RUN_LOCK)
    if lock is None:
        owner = read_record(Path(run_dir) / RUN_OWNER, what="run folder owner") or {}
        who = f"pid {owner.get('pid')} on {owner.get('host')} since {owner.get('since')}" if owner else "another process"
        raise RunDirBusy(f"paths.output_dir={run_dir} is in use by another prunelab run ({who}); wait for it "
                         "to finish (then re-run: finished stages are reused) or choose another output directory")
    _HELD[key] = lock
    atomic_write_json({"pid": os.getpid(), "host": socket.gethostname(),
                       "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, Path(run_dir) / RUN_OWNER)
    clean_stale_tmp(run_dir)


def release_run_dirs() -> None:
    """Release every run-folder lock this process holds (the end of a run, successful or not)."""
    while _HELD:
        _, lock = _HELD.popitem()
        lock.release()
