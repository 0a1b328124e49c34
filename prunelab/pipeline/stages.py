"""The stages shared by every schedule: pretrain (cached), prune, fine-tune.

Each stage records its metrics in ``<run_dir>/stages/<stage>.json`` next to its state
(``<stage>.pt``: model state dict and masks); a stage whose record and state exist and pass their checks
(:meth:`RunContext.load_done`) is loaded instead of re-run, and a training stage interrupted mid-way resumes
from its last epoch checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from prunelab.pipeline.console import banner, choice
from prunelab.pipeline.console import epochs as _epochs
from prunelab.pipeline.context import RunContext, is_rank_zero
from prunelab.pipeline.tracking import ValidationTracker
from prunelab.pruning.masks import MaskSet
from prunelab.pruning.method import TrainingMethod
from prunelab.pruning.target import prune_to_target
from prunelab.utils.finite import check_finite_model
from prunelab.utils.io import atomic_torch_save

log = logging.getLogger(__name__)


class SaveWeightsAtEpoch(pl.Callback):
    """Keeps a copy of the weights after epoch ``k`` (lottery-ticket rewinding to epoch k)."""

    def __init__(self, epoch: int, path: Path):
        self.epoch, self.path = int(epoch), path

    def on_train_epoch_end(self, trainer, module):
        if trainer.current_epoch + 1 == self.epoch and trainer.is_global_zero:
            atomic_torch_save({k: v.detach().cpu().clone() for k, v in module.model.state_dict().items()},
                              self.path)


def pretrain(ctx: RunContext, rewind_epoch: int | None = None) -> tuple[nn.Module, dict, dict]:
    """The dense pretrained model, from the cache or trained now (under a file lock, so concurrent runs of a
    sweep pretrain once). Returns (model, init_state, record); the record says whether it was cached and
    where (``dir``). See :mod:`prunelab.pipeline.cache` for the key and the checks made before a reuse."""
    entry = ctx.dense_entry()
    opt = ctx.cfg.pretrain.optimizer
    banner("pretrain", f"dense model, {_epochs(ctx.cfg.pretrain.epochs)}, {opt.name} lr {opt.lr} (cache {entry.dir})")
    model = ctx.build_model()
    init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def reuse(move: bool) -> tuple[nn.Module, dict, dict] | None:
        hit = entry.load(model, rewind_epoch, move=move)
        if hit is None:
            return None
        log.info("pretrain: dense model loaded from cache %s", entry.dir)
        record = dict(hit[1], cached=True, dir=str(entry.dir))
        ctx.stages["pretrain"] = record
        return model, hit[0], record

    # Without the lock first: a complete entry never changes, and a read-only cache has no lock to take.
    found = reuse(move=False)
    if found is not None:
        return found
    if is_rank_zero() and not entry.writable():
        raise PermissionError(
            f"paths.cache_dir={ctx.cache_dir} is read-only and holds no complete, intact dense model for this "
            f"configuration (folder dense/{entry.key}); point paths.cache_dir to a writable directory (or to a "
            "cache that holds this model)")
    # Only global rank 0 takes the lock: under DDP the other ranks must join the same training run.
    lock = entry.lock() if is_rank_zero() else contextlib.nullcontext()
    with lock:
        found = reuse(move=is_rank_zero())  # another process may have filled it (or found it damaged)
        if found is not None:
            return found
        if is_rank_zero():
            entry.begin(init_state)
        epochs = int(ctx.cfg.pretrain.epochs)
        module = ctx.module(model, "pretrain", ctx.cfg.pretrain.optimizer, ctx.cfg.pretrain.scheduler)
        ckpt_dir = entry.dir / "checkpoints"
        start = time.perf_counter()
        rewind_file = entry.rewind_file(rewind_epoch)
        extra = [SaveWeightsAtEpoch(rewind_epoch, rewind_file)] if rewind_file is not None else []
        ctx.fit(module, epochs, ckpt_dir, callbacks=extra)
        train_time = time.perf_counter() - start
        metrics = ctx.evaluate(model, "pretrain")
        record = {"metrics": metrics, "epochs": epochs, "train_time_s": train_time, "cached": False,
                  "key": entry.key}
        if is_rank_zero():
            entry.finish(model, record, ctx.advice("pretrain"))
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        else:
            check_finite_model(model, "pretrain: the trained dense model", ctx.advice("pretrain"))
        ctx.log_metrics(metrics)
        record = dict(record, dir=str(entry.dir))
        ctx.stages["pretrain"] = record
        return model, init_state, record


def prune_stage(ctx: RunContext, model: nn.Module, masks: MaskSet, sparsity: float, stage: str = "prune",
                target: str | None = None, round: int | None = None) -> MaskSet:
    """Score and prune ``model`` to ``sparsity`` (direct or effective target), evaluate it, record it.

    Metrics are named by the stage kind (``prune/...``) whatever the schedule; a ``round`` (iterative
    pruning) is recorded in the record's ``round`` field and names its artefacts ``<stage>_round<r>``."""
    name = stage if round is None else f"{stage}_round{round}"
    banner(name, f"method={choice('method', type(ctx.scorer).__name__)} to sparsity {sparsity:.4g} "
                 f"({target or ctx.cfg.prune.target} target)")
    done = ctx.load_done(name, ("target_info", "layers_effective"))
    if done is not None:
        ctx.stages[name], state = done
        model.load_state_dict(state["model"])
        return MaskSet.from_state_dict(state["masks"])
    start = time.perf_counter()
    if hasattr(ctx.scorer, "input_shape"):
        ctx.scorer.input_shape = ctx.input_shape
    masks, info = prune_to_target(
        model, masks, ctx.scorer, ctx.allocation, sparsity, ctx.score_batches(),
        target=target or str(ctx.cfg.prune.target), input_shape=ctx.input_shape,
    )
    prune_time = time.perf_counter() - start
    sp = ctx.sparsity_metrics(model, masks, stage)
    metrics = {**sp["metrics"], **ctx.evaluate(model, stage, masks), f"{stage}/time_s": prune_time}
    record = {"metrics": metrics, "target_info": info, "layers_effective": sp["layers_effective"]}
    if round is not None:
        record["round"] = round
    ctx.log_metrics(metrics)
    ctx.save_stage(name, record, model, masks)
    return masks


def method_prune_stage(ctx: RunContext, model: nn.Module, stage: str = "prune", schedule: Any = None,
                       optimizer=None, scheduler=None) -> tuple[nn.Module, MaskSet | None]:
    """Prune with a :class:`TrainingMethod`: one-shot from scores (``schedule=None``) or while training for
    ``schedule.epochs`` (its hook drives pruning), then the method's ``finish`` (compaction for structured
    methods). Records the cost of the model before and after (params, FLOPs, latency) and the accuracy of the
    pruned network; returns the pruned (compact) network and the masks of the pruned units it still holds
    (``None`` when every pruned unit was removed), which the fine-tuning stage enforces."""
    banner(stage, f"method={choice('method', type(ctx.scorer).__name__)}, "
                  + (f"while training {_epochs(schedule.epochs)}" if schedule is not None else "one shot"))
    done = ctx.load_done(stage, ("method",), state_keys=("module",))
    if done is not None:
        ctx.stages[stage], state = done
        masks = MaskSet.from_state_dict(state["masks"]) if state.get("masks") is not None else None
        return state["module"], masks
    method: TrainingMethod = ctx.scorer
    before = ctx.cost(model)
    start = time.perf_counter()
    if schedule is None:
        small, masks, info = method.one_shot(ctx, model, ctx.score_batches())
        train_time = 0.0
    else:
        train_model, hook = method.attach(ctx, model, schedule)
        module = ctx.module(train_model, stage, optimizer, scheduler, hook=hook)
        train_time = ctx.fit(module, int(schedule.epochs), ctx.run_dir / "checkpoints" / stage)
        small, masks, info = method.finish(ctx, module.model, hook)
    prune_time = time.perf_counter() - start
    after = ctx.cost(small)
    metrics = {**ctx.structure_metrics(before, after, stage, small, masks),
               **{f"{stage}/{k}": v for k, v in info.pop("metrics", {}).items()},
               **ctx.evaluate(small, stage), f"{stage}/time_s": prune_time, f"{stage}/train_time_s": train_time}
    record = {"metrics": metrics, "method": info}
    ctx.log_metrics(metrics)
    ctx.save_stage(stage, record, small, masks, extra={"module": small})
    if is_rank_zero():
        shutil.rmtree(ctx.run_dir / "checkpoints" / stage, ignore_errors=True)
    return small, masks


def train_stage(ctx: RunContext, model: nn.Module, masks: MaskSet | None, stage: str, epochs: int,
                optimizer, scheduler, teacher: nn.Module | None = None,
                use_strategy: bool = True, recipe: str = "finetune",
                weight_masks: bool = True) -> tuple[nn.Module, MaskSet | None]:
    """Train the pruned model (``finetune`` and retraining rounds). With ``use_strategy`` the fine-tuning
    strategy of the config may transform the model during training (over-parameterization, distillation).
    ``recipe``: which config section ``epochs``/``optimizer``/``scheduler`` came from (``pretrain`` or
    ``finetune``), recorded in the stage record. ``weight_masks=False``: ``masks`` hold the units a
    training-time method pruned but could not remove (:class:`~prunelab.pruning.method.Finished`); they are
    enforced the same way and applied again after a strategy's ``finish`` (whatever its ``remask``: they are
    structure, not weight sparsity). The stage records no weight-sparsity metrics for them: the prune stage's
    structure metrics stay the run's figures."""
    banner(stage, f"{_epochs(epochs)}, recipe {recipe} ({optimizer['name']} lr {optimizer['lr']})")
    done = ctx.load_done(stage, ("epochs", "strategy"))
    if done is not None:
        ctx.stages[stage], state = done
        if state.get("module") is not None:
            model = state["module"]
        else:
            model.load_state_dict(state["model"])
        masks = MaskSet.from_state_dict(state["masks"]) if state["masks"] is not None else None
        return model, masks
    info: dict[str, Any] = {}
    structural = None if weight_masks else masks  # units a compaction kept, zero: part of the structure
    if use_strategy:
        prepared = ctx.finetune.prepare(model, masks, teacher)
    else:
        from prunelab.finetune.base import Prepared

        prepared = Prepared(model, masks)
    module = ctx.module(prepared.model, stage, optimizer, scheduler, prepared.masks, prepared.extra_loss)
    ckpt_dir = ctx.run_dir / "checkpoints" / stage
    best = None
    if use_strategy and getattr(ctx.finetune, "keep_best", False):
        best = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=f"{stage}/val/acc", mode="max",
                               save_top_k=1, enable_version_counter=False)
    tracker = ValidationTracker(stage)
    train_time = ctx.fit(module, epochs, ckpt_dir, callbacks=[tracker] + ([best] if best else []))
    if best is not None:
        if best.best_model_path:
            state = torch.load(best.best_model_path, map_location=module.device, weights_only=False)
            module.load_state_dict(state["state_dict"])
            info["best_epoch"] = int(state["epoch"])
            info["best_val_acc"] = float(best.best_model_score)
        else:
            log.warning("%s: finetune.keep_best but no validation ran; keeping the last epoch", stage)
    prepared.model = module.model
    prepared.masks = module.masks
    if use_strategy:
        model, masks, strategy_info = ctx.finetune.finish(prepared)
        info.update(strategy_info)
        if structural is not None:  # a strategy may train them (over-parameterized fine-tuning cannot enforce
            structural.apply(model)  # masks on the expanded layers): they are pruned units, zero again
            masks = structural
    else:
        model, masks = prepared.model, prepared.masks
    metrics = {**ctx.evaluate(model, stage, masks), **tracker.metrics(), f"{stage}/train_time_s": train_time}
    if masks is not None and weight_masks:
        metrics.update(ctx.sparsity_metrics(model, masks, stage)["metrics"])
    record = {"metrics": metrics, "epochs": epochs, "recipe": recipe, "strategy": info}
    if module.mask_sync is not None:
        record["mask_sync"] = module.mask_sync
    ctx.log_metrics(metrics)
    structural = bool(info.get("structural_change"))
    ctx.save_stage(stage, record, model, masks, extra={"module": model} if structural else None)
    if is_rank_zero():
        shutil.rmtree(ctx.run_dir / "checkpoints" / stage, ignore_errors=True)
    return model, masks
