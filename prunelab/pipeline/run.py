"""Run one configured experiment end to end and write ``results.json``.

Everything that can be checked is checked before any training starts (options, sparsity, the data files,
the model against the data's input shape, the output directory), so a bad input fails in seconds.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from prunelab.config import OPTIMIZERS, SCHEDULERS, TARGETS, identity, stable_hash
from prunelab.pipeline.context import RunContext, is_rank_zero
from prunelab.pruning.masks import sparsity_from_options
from prunelab.pruning.method import TrainingMethod
from prunelab.utils.io import atomic_write_json, check_writable, read_json

log = logging.getLogger(__name__)

GROUPS = ("data", "model", "method", "allocation", "schedule", "finetune")


def _check_target_options(group: str, node: DictConfig) -> None:
    """Unknown option in a ``_target_`` group: a clear error naming the option and the allowed ones."""
    if not OmegaConf.is_dict(node) or "_target_" not in node:
        raise ValueError(f"config group {group!r} must set _target_")
    target = node["_target_"]
    fn = get_class(target) if not target.endswith("build_model") else None
    if fn is None:
        return  # build_model forwards **kwargs to the architecture factory, which checks them
    sig = inspect.signature(fn)
    if any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        return
    allowed = [p for p in sig.parameters if p != "self"]
    for key in node:
        if key.startswith("_"):
            continue
        if key not in allowed:
            raise ValueError(f"{group}.{key} is not an option of {target}; allowed options: {', '.join(allowed)}")


def validate(cfg: DictConfig) -> float:
    """Checks that need no data or model. Returns the target sparsity."""
    sparsity = sparsity_from_options(cfg.prune.sparsity, cfg.prune.compression)
    if cfg.prune.target not in TARGETS:
        raise ValueError(f"prune.target={cfg.prune.target!r}; allowed values: {', '.join(TARGETS)}")
    if int(cfg.pretrain.epochs) < 0:
        raise ValueError(f"pretrain.epochs must be >= 0, got {cfg.pretrain.epochs}")
    for group in GROUPS:
        _check_target_options(group, cfg[group])
    recipes = [("pretrain", cfg.pretrain)] + ([("finetune", cfg.finetune)] if "optimizer" in cfg.finetune else [])
    for prefix, node in recipes:
        if node.optimizer.name not in OPTIMIZERS:
            raise ValueError(f"{prefix}.optimizer.name={node.optimizer.name!r}; allowed values: {', '.join(OPTIMIZERS)}")
        if node.scheduler.name not in SCHEDULERS:
            raise ValueError(f"{prefix}.scheduler.name={node.scheduler.name!r}; allowed values: {', '.join(SCHEDULERS)}")
    return sparsity


def claim_run_dir(run_dir: Path, cfg: DictConfig) -> None:
    """Stage records in ``run_dir`` are reused on re-runs, so the folder must belong to this configuration:
    ``run.json`` records the run's hash; another configuration's folder is an error, not silently reused."""
    run_id = stable_hash(identity(cfg))
    marker = run_dir / "run.json"
    if marker.exists():
        other = read_json(marker).get("run_id")
        if other != run_id:
            raise ValueError(
                f"paths.output_dir={run_dir} holds a run of another configuration (run_id {other}, this one is "
                f"{run_id}); choose another output directory or delete that one"
            )
    elif is_rank_zero():
        atomic_write_json({"run_id": run_id, "identity": identity(cfg)}, marker)


def _instantiate(node, **kwargs):
    """``hydra.utils.instantiate`` that re-raises the target's own error (Hydra wraps it in an
    InstantiationException whose message buries the option name)."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, (ValueError, TypeError, FileNotFoundError, PermissionError, KeyError)):
            raise cause from None
        raise


def build_context(cfg: DictConfig) -> RunContext:
    sparsity = validate(cfg)
    run_dir = check_writable(cfg.paths.output_dir, "paths.output_dir")
    claim_run_dir(run_dir, cfg)
    cache_dir = check_writable(cfg.paths.cache_dir, "paths.cache_dir")
    # Cheap objects first (their constructors check their options), then the data, then the model.
    scorer = _instantiate(cfg.method)
    allocation = _instantiate(cfg.allocation)
    finetune = _instantiate(cfg.finetune)
    schedule = _instantiate(cfg.schedule)
    schedule.check(scorer)
    dm = _instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    # Instantiating the model checks it against the data's input shape (a zero batch goes through it).
    _instantiate(cfg.model, input_shape=tuple(dm.input_shape), num_classes=int(dm.num_classes))
    loggers = []
    if cfg.get("logger"):
        for lg in cfg.logger.values():
            if lg is not None and "_target_" in lg:
                loggers.append(_instantiate(lg))
    callbacks = [cfg.callbacks[k] for k in (cfg.get("callbacks") or {})]
    return RunContext(cfg=cfg, run_dir=run_dir, cache_dir=cache_dir, datamodule=dm, scorer=scorer,
                      allocation=allocation, finetune=finetune, schedule=schedule, sparsity=sparsity,
                      loggers=loggers, callbacks_cfg=callbacks)


def final_metrics(ctx: RunContext) -> dict[str, Any]:
    """The ``final`` block of results.json from the stage records."""
    ft = ctx.stages.get("finetune", {}).get("metrics", {})
    pr = ctx.stages.get("prune", {}).get("metrics", {})
    pre = ctx.stages.get("pretrain", {}).get("metrics", {})
    # sparsity, params and FLOPs of the final model: from the last stage that measured them
    last = next((n for n in ("finetune", "prune") if f"{n}/params/total" in ctx.stages.get(n, {}).get("metrics", {})),
                "prune")
    src = ctx.stages.get(last, {}).get("metrics", {})

    def g(key, default=None):
        return src.get(f"{last}/{key}", default)

    final = {
        "test_acc": ft.get("finetune/test/acc", pr.get("prune/test/acc")),
        "test_loss": ft.get("finetune/test/loss", pr.get("prune/test/loss")),
        "pretrain_test_acc": pre.get("pretrain/test/acc"),
        "prune_test_acc": pr.get("prune/test/acc"),
        "sparsity_direct": g("sparsity/direct"),
        "compression_direct": g("compression/direct"),
        "sparsity_effective": g("sparsity/effective"),
        "compression_effective": g("compression/effective"),
        "layer_collapse": bool(g("layer_collapse", 0.0)),
        "params_total": g("params/total"),
        "params_remaining": g("params/remaining"),
        "flops_dense": g("flops/dense"),
        "flops_remaining": g("flops/remaining"),
        "sparsity_target": ctx.sparsity,
        "target": str(ctx.cfg.prune.target),
    }
    # structured pruning: cost before/after the compaction (params, FLOPs, latency, speedups), the method's
    # own summary (e.g. reliability), and its target
    for key, value in pr.items():
        if key.startswith("prune/structure/"):
            final[key[len("prune/structure/"):]] = value
    final.update(ctx.stages.get("prune", {}).get("method", {}).get("final", {}))
    if isinstance(ctx.scorer, TrainingMethod):
        final["sparsity_target"], final["target"] = ctx.scorer.target()
    final.update(ctx.extra_final)
    return final


def layer_rows(ctx: RunContext, masks) -> list[dict]:
    eff = ctx.stages.get("prune", {}).get("layers_effective", {})
    rows = masks.layer_stats() if masks is not None else []
    for row in rows:
        row["effective_remaining"] = eff.get(row["name"])
    return rows


def finished_results(cfg: DictConfig) -> dict[str, Any] | None:
    """The stored results when this exact configuration already finished in its output folder."""
    run_dir = Path(cfg.paths.output_dir)
    marker, results_file = run_dir / "run.json", run_dir / "results.json"
    if not (marker.exists() and results_file.exists()):
        return None
    if read_json(marker).get("run_id") != stable_hash(identity(cfg)):
        return None  # claim_run_dir reports the clash
    results = read_json(results_file)
    results["results_file"] = str(results_file)
    results["skipped"] = True
    return results


def run_pipeline(cfg: DictConfig) -> dict[str, Any]:
    """Run the configured experiment; returns the results dict (also written to ``results.json``)."""
    start = time.perf_counter()
    done = finished_results(cfg)
    if done is not None:
        log.info("already done: %s (delete it to run again)", done["results_file"])
        return done
    ctx = build_context(cfg)
    results_file = Path(ctx.run_dir) / "results.json"
    log.info("run dir: %s", ctx.run_dir)
    model, masks = ctx.schedule.run(ctx)
    if masks is None and getattr(ctx.scorer, "structured", False) and is_rank_zero():
        export_compact(ctx, model)
    results = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "run_id": stable_hash(identity(cfg)),
        "final": final_metrics(ctx),
        "stages": ctx.stages,
        "layers": layer_rows(ctx, masks),
        "wall_time_s": time.perf_counter() - start,
        "torch": torch.__version__,
    }
    for lg in ctx.loggers:
        lg.log_hyperparams({"final/" + k: v for k, v in results["final"].items()
                            if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isinf(v))})
        lg.finalize("success")
    if is_rank_zero():
        atomic_write_json(results, results_file)
        _finish_wandb(ctx)
    results["results_file"] = str(results_file)
    return results


def export_compact(ctx: RunContext, model) -> None:
    """The pruned network as a plain module: ``model_compact.pt`` (loads with ``torch.load``, no prunelab
    surgery needed) and, with ``measure.onnx``, ``model_compact.onnx``."""
    from prunelab.pruning.units.compact import export_onnx, save_compact

    model = model.cpu().eval()
    save_compact(model, ctx.run_dir / "model_compact.pt")
    if ctx.cfg.measure.onnx:
        export_onnx(model, ctx.run_dir / "model_compact.onnx", torch.zeros(1, *ctx.input_shape))


def _finish_wandb(ctx: RunContext) -> None:
    for lg in ctx.loggers:
        if type(lg).__name__ == "WandbLogger":
            import wandb

            if lg._experiment is not None:
                lg.experiment.summary.update({k: v for k, v in final_metrics(ctx).items()
                                              if isinstance(v, (int, float, bool))})
            wandb.finish()
