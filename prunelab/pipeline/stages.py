"""The stages shared by every schedule: pretrain (cached), prune, fine-tune.

Each stage records its metrics in ``<run_dir>/stages/<stage>.json`` next to its state
(``<stage>.pt``: model state dict and masks); a stage whose record exists is loaded instead of re-run, and
a training stage interrupted mid-way resumes from its last epoch checkpoint.
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

from prunelab.pipeline.context import RunContext, is_rank_zero
from prunelab.pruning.masks import MaskSet
from prunelab.pruning.method import TrainingMethod
from prunelab.pruning.target import prune_to_target
from prunelab.utils.io import atomic_torch_save, atomic_write_json, file_lock, read_json

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
    sweep pretrain once). Returns (model, init_state, record); the record says whether it was cached."""
    cache = ctx.dense_dir()
    model_file, init_file, rec_file = cache / "model.pt", cache / "init.pt", cache / "metrics.json"
    rewind_file = cache / f"rewind_epoch{rewind_epoch}.pt" if rewind_epoch else None

    def cached() -> bool:
        return model_file.exists() and rec_file.exists() and (rewind_file is None or rewind_file.exists())

    model = ctx.build_model()
    # Only global rank 0 takes the lock: under DDP the other ranks must join the same training run.
    lock = file_lock(ctx.cache_dir / "locks" / f"{cache.name}.lock") if is_rank_zero() else contextlib.nullcontext()
    with lock:
        init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if cached():
            log.info("pretrain: dense model loaded from cache %s", cache)
            model.load_state_dict(torch.load(model_file, map_location="cpu", weights_only=True))
            record = dict(read_json(rec_file), cached=True)
            init_state = torch.load(init_file, map_location="cpu", weights_only=True)
            ctx.stages["pretrain"] = record
            return model, init_state, record
        if is_rank_zero():
            atomic_torch_save(init_state, init_file)
        epochs = int(ctx.cfg.pretrain.epochs)
        module = ctx.module(model, "pretrain", ctx.cfg.pretrain.optimizer, ctx.cfg.pretrain.scheduler)
        ckpt_dir = cache / "checkpoints"
        start = time.perf_counter()
        extra = [SaveWeightsAtEpoch(rewind_epoch, rewind_file)] if rewind_epoch else []
        ctx.fit(module, epochs, ckpt_dir, callbacks=extra)
        train_time = time.perf_counter() - start
        metrics = ctx.evaluate(model, "pretrain")
        record = {"metrics": metrics, "epochs": epochs, "train_time_s": train_time, "cached": False,
                  "key": ctx.dense_key()}
        if is_rank_zero():
            atomic_torch_save(model.state_dict(), model_file)
            atomic_write_json(record, rec_file)
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        ctx.log_metrics(metrics)
        ctx.stages["pretrain"] = record
        return model, init_state, record


def prune_stage(ctx: RunContext, model: nn.Module, masks: MaskSet, sparsity: float, stage: str = "prune",
                target: str | None = None) -> MaskSet:
    """Score and prune ``model`` to ``sparsity`` (direct or effective target), evaluate it, record it."""
    done = ctx.stage_done(stage)
    if done is not None:
        state = ctx.load_stage(stage)
        model.load_state_dict(state["model"])
        masks = MaskSet.from_state_dict(state["masks"])
        ctx.stages[stage] = done
        log.info("%s: loaded from %s", stage, ctx.stage_path(stage, "json"))
        return masks
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
    ctx.log_metrics(metrics)
    ctx.save_stage(stage, record, model, masks)
    return masks


def method_prune_stage(ctx: RunContext, model: nn.Module, stage: str = "prune", schedule: Any = None,
                       optimizer=None, scheduler=None) -> tuple[nn.Module, MaskSet | None]:
    """Prune with a :class:`TrainingMethod`: one-shot from scores (``schedule=None``) or while training for
    ``schedule.epochs`` (its hook drives pruning), then the method's ``finish`` (compaction for structured
    methods). Records the cost of the model before and after (params, FLOPs, latency) and the accuracy of the
    pruned network; returns the pruned (compact) network and the masks of the pruned units it still holds
    (``None`` when every pruned unit was removed), which the fine-tuning stage enforces."""
    done = ctx.stage_done(stage)
    if done is not None:
        ctx.stages[stage] = done
        log.info("%s: loaded from %s", stage, ctx.stage_path(stage, "json"))
        state = ctx.load_stage(stage)
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
    metrics = {**ctx.structure_metrics(before, after, stage),
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
                use_strategy: bool = True, weight_masks: bool = True) -> tuple[nn.Module, MaskSet | None]:
    """Train the pruned model (``finetune`` and retraining rounds). With ``use_strategy`` the fine-tuning
    strategy of the config may transform the model during training (over-parameterization, distillation).
    ``weight_masks=False``: ``masks`` hold the units a training-time method pruned but could not remove
    (:class:`~prunelab.pruning.method.Finished`); they are enforced the same way, but the stage records no
    weight-sparsity metrics for them (the prune stage's structure metrics stay the run's figures)."""
    done = ctx.stage_done(stage)
    if done is not None:
        state = ctx.load_stage(stage)
        if state.get("module") is not None:
            model = state["module"]
        else:
            model.load_state_dict(state["model"])
        masks = MaskSet.from_state_dict(state["masks"]) if state["masks"] is not None else None
        ctx.stages[stage] = done
        log.info("%s: loaded from %s", stage, ctx.stage_path(stage, "json"))
        return model, masks
    info: dict[str, Any] = {}
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
    train_time = ctx.fit(module, epochs, ckpt_dir, callbacks=[best] if best else None)
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
    else:
        model, masks = prepared.model, prepared.masks
    metrics = {**ctx.evaluate(model, stage, masks), f"{stage}/train_time_s": train_time}
    if masks is not None and weight_masks:
        metrics.update(ctx.sparsity_metrics(model, masks, stage)["metrics"])
    record = {"metrics": metrics, "epochs": epochs, "strategy": info}
    if module.mask_sync is not None:
        record["mask_sync"] = module.mask_sync
    ctx.log_metrics(metrics)
    structural = bool(info.get("structural_change"))
    ctx.save_stage(stage, record, model, masks, extra={"module": model} if structural else None)
    if is_rank_zero():
        shutil.rmtree(ctx.run_dir / "checkpoints" / stage, ignore_errors=True)
    return model, masks
