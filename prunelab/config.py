"""Typed config schemas (Hydra ConfigStore), the resolvers that name run and sweep folders, and the
resolution of the pruning target (``prune.sparsity`` / ``prune.compression``).

The schema types the top-level keys other tools rely on (``seed``, ``prune``, ``pretrain``, ``paths``):
a misspelt key or a wrong type fails at start-up with Hydra's message, and a key added with ``+`` that the
schema does not know is refused by ``prunelab.pipeline.checks``. Group configs (``data``, ``model``,
``method``, ...) are instantiated through ``_target_``; their options are checked against the target's
signature (names and types) before anything runs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict


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


# The target when neither prune.sparsity nor prune.compression is set (both default to null, so that either
# one can be given on the command line).
DEFAULT_SPARSITY = 0.9


@dataclass
class PruneConfig:
    sparsity: float | None = None     # null and compression null: DEFAULT_SPARSITY
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
    min_run_time: float = 0.2     # seconds of timed forward passes per batch size (torch.utils.benchmark)


@dataclass
class AccelConfig:
    channels_last: bool = False   # NHWC weights and batches (prunelab.training.accel)
    compile: bool = False         # torch.compile the model's forward for each training stage
    compile_mode: str | None = None
    compile_backend: str = "inductor"


@dataclass
class PrunelabConfig:
    name: str = "default"
    seed: int = 0
    threads: int | None = None    # torch threads for the whole run (null: torch's default); see README Determinism
    prune: PruneConfig = field(default_factory=PruneConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    accel: AccelConfig = field(default_factory=AccelConfig)
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
    debug: str | None = None      # set by the debug group (conf/debug/): the option's name
    callbacks: Any = field(default_factory=dict)  # extra Lightning callbacks: {name: {_target_: ...}}
    tags: list[str] = field(default_factory=list)  # extra W&B tags
    optimized_metric: str | None = None  # what a sweeper optimizes (null: finetune/val/acc_best)


# One line of `prunelab --help` per top-level key that is not a config group (``${prunelab_help_keys:}`` in
# conf/hydra/help/prunelab.yaml renders the keys of the schema; tests/test_cli.py checks every key is described).
KEY_HELP = {
    "name": "the run's group: the folder outputs/{runs,multirun}/<name> and the W&B group",
    "seed": "the seed of the model's initialisation, the data splits and the shuffling",
    "threads": "torch threads for the whole run (null: torch's default)",
    "prune": "the target: prune.sparsity (0 <= s < 1) or prune.compression (>= 1), default sparsity 0.9; "
             "prune.target (direct | effective); which weights: include, exclude_first, exclude_last, exclude; "
             "score_batches, score_batch_size (data-driven scorers)",
    "pretrain": "the dense model's training: epochs, optimizer.{name,lr,momentum,weight_decay,...}, "
                "scheduler.{name,milestones,gamma,warmup_epochs}; cached in paths.cache_dir",
    "measure": "cost of structurally pruned models: latency, batch_sizes, warmup, repeats, threads, onnx",
    "accel": "training speed, same results up to rounding: channels_last, compile, compile_mode, compile_backend",
    "paths": "root, data_dir (datasets), cache_dir (dense models), output_dir (this run's folder)",
    "callbacks": "extra Lightning callbacks: {name: {_target_: ...}}",
    "debug": "the debug option chosen (debug=...): fast runs that never write the shared cache",
    "tags": "extra W&B tags: tags=[a,b]",
    "optimized_metric": "what a sweeper (hparams_search) optimizes; null: the fine-tuning's best validation accuracy",
}

TARGETS = ("direct", "effective")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("cosine", "step", "constant")

# Keys that do not change what a run computes: left out of run hashes (output folders and the cache).
# ``debug`` only names the debug option; the settings it changes (trainer limits, epochs) are in the identity.
NON_IDENTITY = {"paths", "logger", "hydra", "name", "hparams_search", "experiment", "callbacks", "measure", "debug",
                "tags", "optimized_metric", "accel"}
# data.steps_per_call: the same steps on the same batches (one process; several processes take one per call)
NON_IDENTITY_SUBKEYS = {"data": {"data_dir", "num_workers", "download", "source_dir", "steps_per_call"},
                        "trainer": {"enable_progress_bar"}}
# Options added after runs existed, each with the value that computes what runs did before it: left out of the
# run's identity at that value, so that a new option does not rename (and re-run, and double-count) every
# finished run; any other value is part of the identity.
IDENTITY_DEFAULTS = {"method": {"residual_gates": "producers", "zero_pruned": False, "l2_epoch_threshold": None}}


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="prunelab_schema", node=PrunelabConfig)


def stable_hash(obj: Any, length: int = 10) -> str:
    """Hash of a JSON-able object, independent of key order."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


# -- what the user set on the command line ------------------------------------------------------------------
def override_key(override: str) -> str:
    """``"+prune.compression=10"`` -> ``"prune.compression"``; ``"method=snip"`` -> ``"method"``."""
    return override.lstrip("~+").split("=", 1)[0].split("@", 1)[0]


def command_line_keys(overrides: Iterable[str] | None = None) -> set[str]:
    """Keys (and groups) set on the command line: ``overrides`` or, by default, this Hydra job's task
    overrides (empty outside a Hydra app)."""
    if overrides is None:
        overrides = task_overrides()
    return {override_key(str(o)) for o in overrides}


def task_overrides() -> list[str]:
    """The overrides the user gave for this job (``hydra.overrides.task``); [] outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [str(o) for o in HydraConfig.get().overrides.task]


# -- the pruning target -------------------------------------------------------------------------------------
def resolve_prune_target(sparsity: Any, compression: Any, explicit: Iterable[str] = ()) -> tuple[Any, Any]:
    """The (sparsity, compression) pair a run uses. Neither set: ``DEFAULT_SPARSITY``. Both set, one of them
    on the command line (``explicit`` keys) and the other by a config file (an experiment overlay): the
    command line wins. Both on the command line or both in config files: returned as they are, and
    ``sparsity_from_options`` refuses them."""
    if sparsity is None and compression is None:
        return DEFAULT_SPARSITY, None
    if sparsity is not None and compression is not None:
        explicit = set(explicit)
        on_cli = ("prune.sparsity" in explicit, "prune.compression" in explicit)
        if on_cli == (False, True):
            return None, compression
        if on_cli == (True, False):
            return sparsity, None
    return sparsity, compression


def apply_prune_target(cfg: DictConfig, explicit: Iterable[str] | None = None) -> None:
    """Write the resolved pruning target into ``cfg`` (in place), so that the run's record, its hash and
    every ``${prune.sparsity}`` interpolation see the value the run uses."""
    if "prune" not in cfg:
        return
    explicit = command_line_keys() if explicit is None else set(explicit)
    s, c = resolve_prune_target(cfg.prune.sparsity, cfg.prune.compression, explicit)
    if (s, c) != (cfg.prune.sparsity, cfg.prune.compression):
        with open_dict(cfg):
            cfg.prune.sparsity, cfg.prune.compression = s, c


# -- run identity -------------------------------------------------------------------------------------------
def identity(cfg: DictConfig | dict, keys: list[str] | None = None) -> dict:
    """The part of the resolved config that determines a run's results (``keys``: only those groups)."""
    out = {}
    for key in cfg:
        if key in NON_IDENTITY or (keys is not None and key not in keys):
            continue
        node = cfg[key]
        value = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        if isinstance(value, dict):
            skip, old = NON_IDENTITY_SUBKEYS.get(key, ()), IDENTITY_DEFAULTS.get(key, {})
            value = {k: v for k, v in value.items() if k not in skip and not (k in old and v == old[k])}
        out[key] = value
    return out


def _overrides_of(root: DictConfig) -> list[str]:
    if "hydra" in root and OmegaConf.select(root, "hydra.overrides.task") is not None:
        return [str(o) for o in root.hydra.overrides.task]
    return task_overrides()


def run_id(root: DictConfig) -> str:
    """The run's hash: :func:`identity` of the config with its pruning target resolved as the run will
    resolve it (so ``prune.compression=10`` alone and an overlay's sparsity overridden on the command line
    name the same folder as the run's ``run.json`` records)."""
    s, c = resolve_prune_target(root.prune.sparsity, root.prune.compression, command_line_keys(_overrides_of(root)))
    if (s, c) != (root.prune.sparsity, root.prune.compression):
        root = copy.deepcopy(root)
        with open_dict(root):
            root.prune.sparsity, root.prune.compression = s, c
    return stable_hash(identity(root))


def run_id_resolver(*, _root_: DictConfig) -> str:
    """``${prunelab_run_id:}``: a hash of everything that determines the run, naming its output folder so
    that re-running the same configuration finds (and resumes or skips) the earlier run."""
    return run_id(_root_)


# -- sweep folders ------------------------------------------------------------------------------------------
# ``hydra.sweep.dir`` is resolved first in the sweep's main config; every launcher (basic, joblib, submitit)
# builds each job's config with ``load_sweep_config``, which copies the main config's resolver cache into the
# job's. The sweep's id and swept keys are stored in that cache, so every job sees the main config's values.
_SWEEP_CACHE = "prunelab_sweep"


def _parse_overrides(overrides: list[str]) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(overrides)


def sweep_info(root: DictConfig) -> dict[str, Any]:
    """``{"id": <hash of the sweep's overrides>, "varying": [swept keys], "overrides": [...]}`` of the sweep
    this config belongs to (computed in the sweep's main config, inherited by its jobs)."""
    cache = OmegaConf.get_cache(root)
    info = cache.get(_SWEEP_CACHE, {}).get("info")
    if info is not None:
        return info
    job = OmegaConf.select(root, "hydra.job")
    if job is not None and not OmegaConf.is_missing(job, "num"):
        # a job's config without the sweep's cache would name another sweep folder per job
        raise RuntimeError("prunelab: a sweep job's config lost its sweep's resolver cache (hydra.sweep.dir)")
    overrides = _overrides_of(root)
    params = OmegaConf.select(root, "hydra.sweeper.params")
    params = OmegaConf.to_container(params, resolve=False) if OmegaConf.is_config(params) else dict(params or {})
    swept = [o.key_or_group for o in _parse_overrides(overrides) if o.is_sweep_override()]
    info = {"id": stable_hash({"overrides": sorted(overrides), "params": params}, 8),
            "varying": sorted(set(swept) | set(params)), "overrides": overrides}
    cache.setdefault(_SWEEP_CACHE, {})["info"] = info
    return info


def sweep_id_resolver(*, _root_: DictConfig) -> str:
    """``${prunelab_sweep_id:}``: names the sweep's folder by a hash of its overrides, so that every sweep
    gets its own folder and re-running the same sweep finds its jobs (they are skipped or resumed)."""
    return sweep_info(_root_)["id"]


def job_dir_resolver(*, _root_: DictConfig) -> str:
    """``${prunelab_job_dir:}``: a job's folder inside its sweep: the swept values and the run hash,
    ``method=snip,seed=1__8c5094df9e`` (only the hash when nothing is swept)."""
    varying = sweep_info(_root_)["varying"]
    values = {o.key_or_group: o.get_value_element_as_str() for o in _parse_overrides(_overrides_of(_root_))}
    parts = [f"{k}={values[k]}" for k in varying if k in values]
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(parts))[:120]
    rid = run_id(_root_)
    return f"{name}__{rid}" if name else rid


def help_keys() -> str:
    """``${prunelab_help_keys:}``: the top-level keys of the schema, one described key per line (wrapped),
    then the config groups on one line."""
    import dataclasses
    import textwrap

    lines, groups = [], []
    for f in dataclasses.fields(PrunelabConfig):
        if f.name in KEY_HELP:
            text = textwrap.wrap(KEY_HELP[f.name], 100 - 19)
            lines.append(f"{f.name:<18} {text[0]}")
            lines += [" " * 19 + t for t in text[1:]]
        else:
            groups.append(f.name)
    if groups:
        lines += [" ".join(groups), " " * 19 + "the config groups above (data.batch_size=64, method=snip, ...)"]
    return "\n".join(lines).replace("$", "$$")


def register_resolvers() -> None:
    for name, fn in (("prunelab_run_id", run_id_resolver), ("prunelab_sweep_id", sweep_id_resolver),
                     ("prunelab_job_dir", job_dir_resolver), ("prunelab_pid", os.getpid),
                     ("prunelab_help_keys", help_keys)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
