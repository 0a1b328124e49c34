"""Typed config schemas (Hydra ConfigStore) and the checks that run before any training.

The schema types the top-level keys other tools rely on (``seed``, ``prune``, ``pretrain``, ``paths``):
a misspelt key or a wrong type fails at start-up with Hydra's message. Group configs (``data``, ``model``,
``method``, ...) are instantiated through ``_target_``; their options are checked by ``validate`` against the
target's signature before anything runs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


@dataclass
class OptimizerConfig:
    name: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    clip_grad_norm: float | None = None


@dataclass
class SchedulerConfig:
    name: str = "cosine"  # cosine | step | constant
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of the epochs (step)
    gamma: float = 0.1
    warmup_epochs: int = 0


@dataclass
class PruneConfig:
    sparsity: float | None = 0.9
    compression: float | None = None
    target: str = "direct"
    include: list[str] = field(default_factory=lambda: ["conv", "linear"])
    exclude_first: bool = False
    exclude_last: bool = False
    exclude: list[str] = field(default_factory=list)
    score_batches: int = 1
    score_batch_size: int | None = None


@dataclass
class PretrainConfig:
    epochs: int = 10
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass
class PathsConfig:
    root: str = "."
    data_dir: str = "data"
    cache_dir: str = "outputs/cache"
    output_dir: str = "outputs/run"


@dataclass
class MeasureConfig:
    latency: bool = True          # measure CPU inference latency of structurally pruned models
    batch_sizes: list[int] = field(default_factory=lambda: [1, 64])
    warmup: int = 3
    repeats: int = 10
    threads: int | None = None    # torch threads while timing (null: as configured)
    onnx: bool = False            # also export the compacted model to ONNX


@dataclass
class PrunelabConfig:
    name: str = "default"
    seed: int = 0
    prune: PruneConfig = field(default_factory=PruneConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    data: Any = MISSING
    model: Any = MISSING
    method: Any = MISSING
    allocation: Any = MISSING
    schedule: Any = MISSING
    finetune: Any = MISSING
    trainer: Any = MISSING
    logger: Any = None
    experiment: Any = None
    hparams_search: Any = None
    callbacks: Any = field(default_factory=dict)  # extra Lightning callbacks: {name: {_target_: ...}}


TARGETS = ("direct", "effective")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("cosine", "step", "constant")

# Keys that do not change what a run computes: left out of run hashes (output folders and the cache).
NON_IDENTITY = {"paths", "logger", "hydra", "name", "hparams_search", "experiment", "callbacks", "measure"}
NON_IDENTITY_SUBKEYS = {"data": {"data_dir", "num_workers", "download", "source_dir"},  # md5-checked: same data
                        "trainer": {"enable_progress_bar"}}


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="prunelab_schema", node=PrunelabConfig)


def stable_hash(obj: Any, length: int = 10) -> str:
    """Hash of a JSON-able object, independent of key order."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def identity(cfg: DictConfig | dict, keys: list[str] | None = None) -> dict:
    """The part of the resolved config that determines a run's results (``keys``: only those groups)."""
    out = {}
    for key in cfg:
        if key in NON_IDENTITY or (keys is not None and key not in keys):
            continue
        node = cfg[key]
        value = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in NON_IDENTITY_SUBKEYS.get(key, ())}
        out[key] = value
    return out


def run_id_resolver(*, _root_: DictConfig) -> str:
    """``${prunelab_run_id:}``: a hash of everything that determines the run, naming its output folder so
    that re-running the same configuration finds (and resumes or skips) the earlier run."""
    return stable_hash(identity(_root_))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("prunelab_run_id"):
        OmegaConf.register_new_resolver("prunelab_run_id", run_id_resolver)
