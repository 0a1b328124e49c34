"""Run one configured experiment end to end and write ``results.json``.

Everything that can be checked is checked before any training starts (options, their types and ranges,
sparsity, the data files, the model against the data's input shape, which weights are prunable, the output
directory), so a bad input fails in seconds with a :class:`~prunelab.errors.UserError` naming the option.
Only then does the run claim its folder (``run.json``) and move Hydra's record of the command into
``.hydra/``: a refused command leaves a finished run's folder as it was.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from prunelab.config import (
    OPTIMIZERS,
    SCHEDULERS,
    TARGETS,
    apply_prune_target,
    identity,
    resolve_prune_target,
    stable_hash,
)
from prunelab.errors import UserError
from prunelab.pipeline import checks
from prunelab.pipeline.cache import cache_root, configure_determinism, hold_run_dir, release_run_dirs
from prunelab.pipeline.console import CURRENT, StageLog
from prunelab.pipeline.context import RunContext, is_rank_zero
from prunelab.pruning.masks import sparsity_from_options
from prunelab.pruning.method import TrainingMethod, check_target_options
from prunelab.results import SCHEMA_VERSION, schema_errors
from prunelab.runinfo import environment, hydra_choices
from prunelab.training.accel import check_accel
from prunelab.utils.io import atomic_write_json, check_writable, read_record

log = logging.getLogger(__name__)

GROUPS = ("data", "model", "method", "allocation", "schedule", "finetune", "trainer")


def _check_target_options(group: str, node: DictConfig) -> None:
    """Unknown option or a value of the wrong type in a ``_target_`` group: a clear error naming the option
    and the allowed ones (for ``model``: the options of ``build_model`` and of the architecture's factory)."""
    if not OmegaConf.is_dict(node) or "_target_" not in node:
        raise UserError(f"config group {group!r} must set _target_")
    target = node["_target_"]
    try:
        fn = get_object(target)
    except Exception as e:
        raise UserError(f"{group}._target_={target!r} cannot be imported ({e})") from None
    if group == "model" and target.endswith("build_model"):
        from prunelab.models import MODELS

        name = node.get("name")
        if name not in MODELS:
            raise UserError(f"model.name={name!r}; allowed values: {', '.join(MODELS.names())}")
        _check_model_options(node, fn, MODELS.get(name))
        return
    checks.check_target_options(group, node, fn)


def _check_model_options(node: DictConfig, build, factory) -> None:
    """``model.*``: the options of ``build_model`` plus those of the architecture's factory (a factory taking
    ``**kwargs``, such as timm's, accepts any name); ``input_shape`` and ``num_classes`` come from the data."""
    import inspect

    fixed = ("input_shape", "num_classes")
    for k in fixed:
        if k in node:
            raise UserError(f"model.{k} is set from the data module, not in the model's config; remove it")
    own = [k for k, p in inspect.signature(build).parameters.items() if k not in fixed and p.kind == p.POSITIONAL_OR_KEYWORD]
    checks.check_target_options("model", node, build, keys=[k for k in node if k in own])
    checks.check_target_options("model", node, factory, keys=[k for k in node if k not in own],
                                also_allowed=own, hidden=fixed)


def validate(cfg: DictConfig) -> float:
    """Checks that need no data or model: unknown keys, every group's options (names, types, ranges), the
    pruning target. Returns the target sparsity."""
    checks.check_known_keys(cfg)
    for group in GROUPS:
        _check_target_options(group, cfg[group])
    checks.check_ranges(cfg)
    checks.check_include_kinds(cfg)
    try:
        sparsity = sparsity_from_options(*resolve_prune_target(cfg.prune.sparsity, cfg.prune.compression,
                                                               _command_line_keys()))
    except ValueError as e:
        raise UserError(str(e)) from None
    try:
        check_accel(cfg.accel)
    except ValueError as e:
        raise UserError(str(e)) from None
    if cfg.prune.target not in TARGETS:
        raise UserError(f"prune.target={cfg.prune.target!r}; allowed values: {', '.join(TARGETS)}")
    recipes = [("pretrain", cfg.pretrain)] + ([("finetune", cfg.finetune)] if "optimizer" in cfg.finetune else [])
    for prefix, node in recipes:
        if node.optimizer.name not in OPTIMIZERS:
            raise UserError(f"{prefix}.optimizer.name={node.optimizer.name!r}; allowed values: {', '.join(OPTIMIZERS)}")
        if node.scheduler.name not in SCHEDULERS:
            raise UserError(f"{prefix}.scheduler.name={node.scheduler.name!r}; allowed values: {', '.join(SCHEDULERS)}")
    return sparsity


def claim_run_dir(run_dir: Path, cfg: DictConfig) -> None:
    """Stage records in ``run_dir`` are reused on re-runs, so the folder must belong to this configuration:
    ``run.json`` records the run's hash; another configuration's folder is an error, not silently reused.
    ``check_run_dir`` is the same check without the claim (before the start-up checks)."""
    check_run_dir(run_dir, cfg)
    marker = run_dir / "run.json"
    # missing, or damaged (check_run_dir treated it as unclaimed): (re)written atomically
    if is_rank_zero() and read_record(marker, ("run_id",), what="run record") is None:
        atomic_write_json({"run_id": stable_hash(identity(cfg)), "identity": identity(cfg)}, marker)


def check_run_dir(run_dir: Path, cfg: DictConfig) -> None:
    run_id = stable_hash(identity(cfg))
    marker = run_dir / "run.json"
    claimed = read_record(marker, ("run_id",), what="run record")  # damaged: treated as unclaimed
    if claimed is not None:
        other = claimed["run_id"]
        if other != run_id:
            raise UserError(
                f"paths.output_dir={run_dir} holds a run of another configuration (run_id {other}, this one is "
                f"{run_id}); choose another output directory or delete that one"
            )


def _hydra_files() -> tuple[Path, Path] | None:
    """(where Hydra wrote this command's config, ``.hydra/``) when they differ (``hydra.output_subdir``)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    runtime_dir = OmegaConf.select(hc, "runtime.output_dir", default=None)
    if hc.output_subdir is None or runtime_dir is None:  # not a Hydra job (a composed config)
        return None
    out = Path(runtime_dir)
    pending, final = out / str(hc.output_subdir), out / ".hydra"
    return None if pending.resolve() == final.resolve() else (pending, final)


def adopt_hydra_files() -> None:
    """Move Hydra's record of this command (``config.yaml``, ``hydra.yaml``, ``overrides.yaml``) into
    ``.hydra/`` once the run owns its folder."""
    paths = _hydra_files()
    if paths is None or not paths[0].is_dir():
        return
    pending, final = paths
    final.mkdir(exist_ok=True)
    for f in pending.iterdir():
        f.replace(final / f.name)
    shutil.rmtree(pending, ignore_errors=True)


def discard_hydra_files() -> None:
    """A refused or skipped command: drop Hydra's record of it when the folder belongs to a run (its
    ``.hydra/`` stays that run's); in a folder no run has claimed, keep it as the record of what failed."""
    paths = _hydra_files()
    if paths is None:
        return
    if (paths[0].parent / "run.json").exists():
        shutil.rmtree(paths[0], ignore_errors=True)
    else:
        adopt_hydra_files()


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


def _load_data(cfg: DictConfig):
    """The data module, prepared and set up. A file error raised outside prunelab's own checks (numpy reading
    a file that is not an archive or lacks an array, a truncated download) is reported with the data option
    and the file; any other exception is a bug and keeps its traceback."""
    import pickle
    import zipfile

    dm = _instantiate(cfg.data)
    path = dm.resolved_path() if callable(getattr(dm, "resolved_path", None)) else None
    if path is not None and str(path).endswith(".npz") and Path(path).is_file() and not zipfile.is_zipfile(path):
        raise UserError(f"data.path={cfg.data.path}: {Path(path).resolve()} is not a .npz archive (the zip file "
                        "numpy.savez / savez_compressed writes, with arrays x, y)")
    try:
        dm.prepare_data()
        dm.setup("fit")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        if isinstance(e, UserError) or _raised_by_prunelab(e):
            raise
        where = f"{Path(path).resolve()} (data.path)" if path is not None else f"data.data_dir={cfg.data.get('data_dir')}"
        first = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"{checks.choice_name('data', cfg.data)}: could not load the data from {where}: "
                        f"{type(e).__name__}: {first}; is it the right file, complete and readable?") from e
    return dm


def _raised_by_prunelab(e: BaseException) -> bool:
    tb = e.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    return last is not None and str(Path(last).resolve()).startswith(str(Path(__file__).resolve().parents[1]))


def check_options(cfg: DictConfig) -> tuple[float, Any, Any, Any, Any]:
    """The checks that need neither data nor a model (``validate``), then the cheap objects built from the
    config (their constructors check their options) and the schedule's check of the method. Returns
    (sparsity, method, allocation, finetune, schedule). The CLI runs this first; so does the test of every
    experiment overlay."""
    sparsity = validate(cfg)
    scorer = _instantiate(cfg.method)
    choice = checks.choice_name("method", cfg.method)
    if choice.startswith("method=") and hasattr(scorer, "name"):
        # one name system: the option the run was configured with (method=random_structured, method=bmrs_u)
        # is the method's name in results.json, the logs and W&B, whatever criterion or rule it runs
        scorer.name = choice.partition("=")[2]
    allocation = _instantiate(cfg.allocation)
    finetune = _instantiate(cfg.finetune)
    schedule = _instantiate(cfg.schedule)
    schedule.check(scorer)
    return sparsity, scorer, allocation, finetune, schedule


def given_target(cfg: DictConfig) -> dict[str, Any]:
    """``prune.sparsity`` / ``prune.compression`` as the command line and the config files set them, before
    :func:`apply_prune_target` writes the default (0.9) in: what :func:`build_context` checks against the
    method (a method that does not read them refuses a value that was given)."""
    return {k: cfg.prune.get(k) for k in ("sparsity", "compression")} if "prune" in cfg else {}


def build_context(cfg: DictConfig, given: dict[str, Any] | None = None) -> RunContext:
    """Every start-up check, then the claim of the run folder; no training has happened when this returns.
    ``given``: the pruning target as set before its default was applied (:func:`given_target`); a method that
    does not read it (``method.amount``, threshold-free BMRS) refuses a value given there."""
    sparsity, scorer, allocation, finetune, schedule = check_options(cfg)
    if given is not None:
        try:
            check_target_options(scorer, given)
        except ValueError as e:
            raise UserError(str(e)) from None
    configure_determinism(cfg)  # threads and deterministic algorithms, before data statistics are computed
    run_dir = check_writable(cfg.paths.output_dir, "paths.output_dir")
    hold_run_dir(run_dir)  # one process per run folder (released by run_pipeline)
    check_run_dir(run_dir, cfg)
    cache_dir = cache_root(cfg, run_dir)  # <run_dir>/cache for debug runs; a read-only complete cache is fine
    if hasattr(schedule, "warn_ignored"):
        schedule.warn_ignored(_command_line_keys())
    dm = _load_data(cfg)
    # Instantiating the model checks it against the data's input shape (a zero batch goes through it); the
    # same cheap instance checks which weights prune.include / prune.exclude select.
    model = _instantiate(cfg.model, input_shape=tuple(dm.input_shape), num_classes=int(dm.num_classes))
    checks.check_prunable(cfg, model, checks.choice_name("model", cfg.model))
    if hasattr(scorer, "check_model"):  # a method's own requirements on the model (before any training)
        try:
            scorer.check_model(model, tuple(dm.input_shape))
        except ValueError as e:
            raise UserError(str(e)) from None
    del model
    loggers = []
    if cfg.get("logger"):
        for lg in cfg.logger.values():
            if lg is not None and "_target_" in lg:
                loggers.append(_instantiate(lg))
    callbacks = [cfg.callbacks[k] for k in (cfg.get("callbacks") or {})]
    claim_run_dir(run_dir, cfg)  # every check passed: the folder is this run's
    adopt_hydra_files()
    CURRENT["run_dir"] = str(run_dir)
    return RunContext(cfg=cfg, run_dir=run_dir, cache_dir=cache_dir, datamodule=dm, scorer=scorer,
                      allocation=allocation, finetune=finetune, schedule=schedule, sparsity=sparsity,
                      loggers=loggers, callbacks_cfg=callbacks, stages=StageLog())


def _command_line_keys() -> set[str]:
    from prunelab.config import command_line_keys

    return command_line_keys()


def final_metrics(ctx: RunContext) -> dict[str, Any]:
    """The ``final`` block of results.json from the stage records (every key: docs/results-schema.md)."""
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
        # validation accuracy of the fine-tuning stage (what a hyper-parameter search may select on)
        "val_acc_best": ft.get("finetune/val/acc_best"),
        "val_acc_last": ft.get("finetune/val/acc_last"),
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
    # structured pruning: cost before/after the compaction (params, FLOPs, latency, speedups and their
    # plausibility), the method's own summary (e.g. reliability), and its target
    for key, value in pr.items():
        if key.startswith("prune/structure/"):
            final[key[len("prune/structure/"):]] = value
    final.update(ctx.stages.get("prune", {}).get("method", {}).get("final", {}))
    if isinstance(ctx.scorer, TrainingMethod):
        final["sparsity_target"], final["target"] = ctx.scorer.target()
    final.update(ctx.extra_final)
    # JSON has no inf/nan (written as null): which values were non-finite, and how. The effective
    # compression is infinite exactly when the network collapsed (layer_collapse), also in a stage record
    # loaded from an earlier attempt (where it already reads null).
    final["nonfinite"] = {k: ("nan" if math.isnan(v) else "inf" if v > 0 else "-inf") for k, v in final.items()
                          if isinstance(v, float) and not math.isfinite(v)}
    return final


def layer_rows(ctx: RunContext, masks) -> list[dict]:
    eff = ctx.stages.get("prune", {}).get("layers_effective", {})
    rows = masks.layer_stats() if masks is not None else []
    for row in rows:
        row["effective_remaining"] = eff.get(row["name"])
    return rows


def finished_results(cfg: DictConfig) -> dict[str, Any] | None:
    """The stored results when this exact configuration already finished in its output folder (the pruning
    target resolved first: ``apply_prune_target``)."""
    run_dir = Path(cfg.paths.output_dir)
    marker, results_file = run_dir / "run.json", run_dir / "results.json"
    if not (marker.exists() and results_file.exists()):
        return None
    claimed = read_record(marker, ("run_id",), what="run record")
    if claimed is None or claimed["run_id"] != stable_hash(identity(cfg)):
        return None  # claim_run_dir reports a clash
    # an empty, truncated or incomplete results.json is recomputed (the stages are reused)
    results = read_record(results_file, ("run_id", "final", "stages"), what="results file")
    if results is None:
        return None
    results["results_file"] = str(results_file)
    results["skipped"] = True
    return results


def run_pipeline(cfg: DictConfig, ctx: RunContext | None = None) -> dict[str, Any]:
    """Run the configured experiment; returns the results dict (also written to ``results.json``).
    ``ctx``: a context built already (:func:`build_context`; the vectorised runner passes one whose stages it
    trained), so results.json is assembled here whatever its keys become."""
    try:
        return _run_pipeline(cfg, ctx)
    finally:
        release_run_dirs()


def _run_pipeline(cfg: DictConfig, ctx: RunContext | None = None) -> dict[str, Any]:
    start = time.perf_counter()
    given = given_target(cfg)
    apply_prune_target(cfg)
    done = finished_results(cfg) if ctx is None else None
    if done is not None:
        discard_hydra_files()
        log.info("already done: %s (delete it to run again)", done["results_file"])
        return done
    try:
        ctx = build_context(cfg, given) if ctx is None else ctx
    except BaseException:
        discard_hydra_files()
        raise
    results_file = Path(ctx.run_dir) / "results.json"
    log.info("run dir: %s", ctx.run_dir)
    model, masks = ctx.schedule.run(ctx)
    if masks is None and getattr(ctx.scorer, "structured", False) and is_rank_zero():
        export_compact(ctx, model)
    elif masks is not None and is_rank_zero():  # unstructured: the masked network, rebuilt by prunelab-eval
        from prunelab.export import FINAL_FILE, save_final

        save_final(model, masks, OmegaConf.to_container(cfg.model, resolve=True), ctx.input_shape,
                   ctx.num_classes, Path(ctx.run_dir) / FINAL_FILE)
    results = {
        "schema_version": SCHEMA_VERSION,
        "run_id": stable_hash(identity(cfg)),
        "choices": hydra_choices(cfg),
        "environment": environment(cfg),
        "config": results_config(cfg),
        "final": final_metrics(ctx),
        "stages": ctx.stages,
        "layers": layer_rows(ctx, masks),
        "wall_time_s": time.perf_counter() - start,
        "debug": ctx.debug,
        "determinism": ctx.determinism,
    }
    check_results(results)
    for lg in ctx.loggers:
        if type(lg).__name__ != "WandbLogger":  # W&B: the run config is the config; final/* go to the summary
            lg.log_hyperparams({"final/" + k: v for k, v in results["final"].items()
                                if isinstance(v, (int, float)) and math.isfinite(v)})
        lg.finalize("success")
    if is_rank_zero():
        atomic_write_json(results, results_file)
        _finish_wandb(ctx, results["final"])
    results["results_file"] = str(results_file)
    return results


STRICT_ENV = "PRUNELAB_STRICT_RESULTS"


def check_results(results: dict[str, Any]) -> None:
    """Validate ``results`` against prunelab/results_schema.json before it is written. A violation is a
    prunelab bug: logged as an error (a finished run keeps its results), raised when the environment sets
    ``PRUNELAB_STRICT_RESULTS=1`` (the test suite does, so every results.json a test writes is checked)."""
    errors = schema_errors(results)
    if not errors:
        return
    msg = "results.json does not match its schema (prunelab/results_schema.json):\n  " + "\n  ".join(errors[:20])
    if os.environ.get(STRICT_ENV, "") not in ("", "0"):
        raise ValueError(msg)
    log.error("%s", msg)


def results_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config for results.json, without the flattened copy of itself that the W&B logger
    node holds (``logger.wandb.config``)."""
    out = OmegaConf.to_container(cfg, resolve=True)
    for node in (out.get("logger") or {}).values():
        if isinstance(node, dict) and isinstance(node.get("config"), dict):
            del node["config"]
    return out


DEFAULT_OBJECTIVE = "finetune/val/acc_best"


def objective(results: dict[str, Any], cfg: DictConfig) -> float:
    """The value a sweeper (``hparams_search=...``) optimizes: ``optimized_metric`` (default
    ``finetune/val/acc_best``, the best validation accuracy of the fine-tuning stage), never a test metric
    unless asked for by name. A ``<stage>/...`` name is read from that stage's record, any other name from
    the ``final`` block. NaN (a failed trial for Optuna) when the run did not record it."""
    name = cfg.get("optimized_metric") or DEFAULT_OBJECTIVE
    if "/" in name:
        stage = name.split("/", 1)[0]
        value = results.get("stages", {}).get(stage, {}).get("metrics", {}).get(name)
        available = sorted(k for rec in results.get("stages", {}).values() for k in rec.get("metrics", {}))
    else:
        value = results.get("final", {}).get(name)
        available = sorted(results.get("final", {}))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        (log.warning if cfg.get("optimized_metric") else log.debug)(
            "optimized_metric=%s was not recorded by this run (validation needs finetune.epochs >= 1 and "
            "validation batches); recorded: %s", name, ", ".join(available))
        return float("nan")
    return float(value)


def export_compact(ctx: RunContext, model) -> None:
    """The compacted network: ``model_compact.pt2`` (torch.export, plain PyTorch loads it), its state dict,
    the pickled module ``model_compact.pt`` and, with ``measure.onnx``, ``model_compact.onnx``
    (:mod:`prunelab.export`)."""
    from prunelab.export import export_compact as export

    export(model, ctx.run_dir, ctx.input_shape, onnx=bool(ctx.cfg.measure.onnx))


def _finish_wandb(ctx: RunContext, final: dict[str, Any]) -> None:
    """The final metrics into the W&B run summary (numbers and flags; non-finite values as null next to
    their flag, as in results.json), then close the run."""
    for lg in ctx.loggers:
        if type(lg).__name__ == "WandbLogger":
            import wandb

            if lg._experiment is not None:
                lg.experiment.summary.update(
                    {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in final.items()
                     if isinstance(v, (int, float, bool)) or (v is None and k in final["nonfinite"])})
            wandb.finish()
