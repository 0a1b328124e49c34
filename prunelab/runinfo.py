"""What a run records about itself besides its numbers: the option names it was started with, the software
and machine it ran on, and the run's W&B name, tags, group and config.

Everything here is cheap (no data, no model; ``git`` only when prunelab runs from a checkout, with a
timeout) and never fails a run: a value that cannot be found is ``None``.
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from prunelab.config import identity, stable_hash

# The config groups a report can group by, in the order they are shown (``choices`` in results.json holds
# every non-Hydra group, these first).
GROUPS = ("method", "allocation", "schedule", "finetune", "model", "data", "trainer")
WANDB_TAG_MAX = 64  # W&B rejects longer tags (the run crashes at its first log call)
_SOURCE_ROOT = Path(__file__).resolve().parent.parent


def _hydra(cfg: DictConfig | None) -> Any:
    """The Hydra node of the job: ``cfg.hydra`` when the config still holds it (``compose(...,
    return_hydra_config=True)``), else the running Hydra app's; None outside Hydra."""
    if cfg is not None and OmegaConf.is_dict(cfg) and "hydra" in cfg:
        return cfg.hydra
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def hydra_choices(cfg: DictConfig | None = None) -> dict[str, str | None]:
    """The option chosen for each config group (``{"method": "bmrs_u", "allocation": "igq", ...}``): Hydra's
    ``runtime.choices`` of the job (:func:`_hydra`). Hydra's own groups (``hydra/...``) and the schema are
    left out; the groups a report groups by come first; ``{}`` outside Hydra."""
    hc = _hydra(cfg)
    choices = OmegaConf.select(hc, "runtime.choices") if hc is not None else None
    if choices is None:
        return {}
    raw = OmegaConf.to_container(choices) if OmegaConf.is_config(choices) else dict(choices)
    out = {k: (None if v is None else str(v)) for k, v in raw.items()
           if not k.startswith("hydra/") and k != "hydra" and not k.endswith("_schema")}
    return {**{g: out[g] for g in GROUPS if g in out}, **{k: v for k, v in out.items() if k not in GROUPS}}


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(_SOURCE_ROOT), *args], capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state() -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the prunelab source tree, only when prunelab
    runs from a checkout (``<root>/.git`` next to ``pyproject.toml``): an installed prunelab inside some
    other repository must not report that repository's commit."""
    if not ((_SOURCE_ROOT / ".git").exists() and (_SOURCE_ROOT / "pyproject.toml").exists()):
        return {"commit": None, "dirty": None}
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def prunelab_version() -> str:
    """The installed distribution's version, or the package's ``__version__`` when not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("prunelab")
    except PackageNotFoundError:
        import prunelab

        return prunelab.__version__


def environment(cfg: DictConfig | None = None) -> dict[str, Any]:
    """The software and the settings that change numbers without being part of the config: versions, git
    commit, threads, determinism."""
    import lightning
    import torch

    git = git_state()
    trainer = cfg.get("trainer") if cfg is not None else None
    det = trainer.get("deterministic") if trainer is not None else None
    return {
        "prunelab_version": prunelab_version(),
        "git_commit": git["commit"],
        "git_dirty": git["dirty"],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "cuda": torch.version.cuda,
        "platform": platform.platform(terse=True),
        "num_threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "trainer_deterministic": det if det is None or isinstance(det, (bool, str)) else str(det),
    }


# W&B -------------------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _target(cfg: DictConfig) -> tuple[str, Any] | None:
    """The pruning target as (name, value): the method's own ``amount`` (structured) or ``sparsity`` (DLLP)
    when it has one, else ``prune.compression`` or ``prune.sparsity``; None for methods without a target."""
    method = cfg.get("method") or {}
    if "amount" in method:
        return f"{method.get('target_kind', 'amount')}", method.amount
    if "rule" in method:  # BMRS-style rules decide how much to prune themselves
        return None
    prune = cfg.get("prune") or {}
    if prune.get("compression") is not None:
        return "compression", prune.compression
    if prune.get("sparsity") is not None:
        return "sparsity", prune.sparsity
    return None


def wandb_tags(cfg: DictConfig) -> list[str]:
    """Short, curated tags (method, allocation, schedule, prune target, compression or sparsity, model, data,
    seed) plus the user's ``tags``; each at most 64 characters (W&B's limit), duplicates removed."""
    choices = hydra_choices(cfg)
    tags = [f"{g}={choices[g]}" for g in ("method", "allocation", "schedule") if choices.get(g)]
    prune = cfg.get("prune") or {}
    if prune.get("target"):
        tags.append(f"target={prune.target}")
    target = _target(cfg)
    if target is not None:
        tags.append(f"{target[0]}={_fmt(target[1])}")
    tags += [f"{g}={choices[g]}" for g in ("model", "data") if choices.get(g)]
    if cfg.get("seed") is not None:
        tags.append(f"seed={cfg.seed}")
    tags += [str(t) for t in (cfg.get("tags") or [])]
    out: list[str] = []
    for t in tags:
        t = t if len(t) <= WANDB_TAG_MAX else t[:WANDB_TAG_MAX - 1] + "…"
        if t not in out:
            out.append(t)
    return out


def wandb_name(cfg: DictConfig) -> str:
    """A readable run name: ``<method> <target>=<value> seed=<seed>`` (e.g. ``snip compression=100 seed=0``;
    ``effective`` marks an effective target)."""
    method = hydra_choices(cfg).get("method") or str((cfg.get("method") or {}).get("_target_", "run")).split(".")[-1]
    parts = [method]
    target = _target(cfg)
    prune = cfg.get("prune") or {}
    if target is not None:
        eff = "effective " if prune.get("target") == "effective" and target[0] in ("compression", "sparsity") else ""
        parts.append(f"{eff}{target[0]}={_fmt(target[1])}")
    parts.append(f"seed={cfg.get('seed')}")
    return " ".join(parts)


def wandb_group(cfg: DictConfig) -> str:
    """One group per sweep: the sweep folder (its last two path components, e.g. ``multirun/default`` or
    ``default/2025-01-01_12-00-00``) in a ``--multirun``, the run's ``name`` otherwise."""
    from hydra.types import RunMode

    hc = _hydra(cfg)
    if hc is not None and hc.get("mode") == RunMode.MULTIRUN and hc.sweep.get("dir"):
        return "/".join(Path(str(hc.sweep.dir)).parts[-2:])[-128:]
    return str(cfg.get("name") or "default")


def flat_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as flat ``a.b.c`` keys for the W&B run config: each group's option name under the
    group's key (``method: bmrs_u``) instead of its ``_target_``, lists as lists, and the ``run_id`` (the
    run's folder name); ``logger`` and ``hydra`` left out."""
    choices = hydra_choices(cfg)
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "_target_":
                    continue
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = node

    for key in cfg:
        if key in ("logger", "hydra"):
            continue
        node = cfg[key]
        walk(str(key), OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node)
    for group, option in choices.items():
        if option is not None:
            out[group] = option
    out["run_id"] = stable_hash(identity(cfg))
    return dict(sorted(out.items()))


def wandb_resolver(field: str, *, _root_: DictConfig, _parent_: DictConfig) -> Any:
    """``${prunelab_wandb:<field>}`` in ``conf/logger/wandb.yaml``: name, tags, group, config, mode."""
    if field == "mode":  # explicit, so that logger.wandb.offline=false wins over WANDB_MODE=offline
        return "offline" if bool(_parent_.get("offline", True)) else "online"
    fns = {"name": wandb_name, "tags": wandb_tags, "group": wandb_group, "config": flat_config}
    if field not in fns:
        raise ValueError(f"${{prunelab_wandb:{field}}}: unknown field; allowed: {', '.join([*fns, 'mode'])}")
    return fns[field](_root_)


def register_resolvers() -> None:
    """Every resolver the configs use: the run/sweep ones of :mod:`prunelab.config` and ``prunelab_wandb``
    (the W&B logger's name, tags, group and config), registered here so that config never imports upward."""
    from prunelab.config import register_resolvers as register_config_resolvers

    register_config_resolvers()
    if not OmegaConf.has_resolver("prunelab_wandb"):
        OmegaConf.register_new_resolver("prunelab_wandb", wandb_resolver)
