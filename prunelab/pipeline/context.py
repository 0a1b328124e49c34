"""Everything a schedule needs for one run, built once from the config, and the one place that reads and
writes run artefacts (stage records, masks, checkpoints) and the dense-model cache.

Artefacts are trusted only after a check: a stage record must hold its required keys and its state file
must be an intact archive with the expected entries (:meth:`RunContext.load_done`), an epoch checkpoint
must be intact before training resumes from it; anything damaged is moved aside or ignored (with a warning
naming the file) and recomputed. A model holding NaN/Inf is never recorded
(:meth:`RunContext.save_stage`) and no sparsity is derived from it (:meth:`RunContext.sparsity_metrics`)."""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch import nn

from prunelab.finetune.base import Finetune
from prunelab.metrics.flops import masked_flops
from prunelab.metrics.latency import (
    benchmark_latency,
    check_speedup,
    count_flops,
    count_params,
    relative_spread,
)
from prunelab.pipeline.cache import (
    DenseEntry,
    data_fingerprint,
    debug_mode,
    dense_identity,
    dense_key,
    determinism_record,
)
from prunelab.pipeline.module import PruneModule
from prunelab.pipeline.progress import StageProgressBar
from prunelab.pruning.allocation import Allocation
from prunelab.pruning.effective import effective_sparsity_report
from prunelab.pruning.masks import MaskSet
from prunelab.pruning.scorers.base import Scorer
from prunelab.training.accel import release
from prunelab.utils.finite import check_finite_model, optimizer_advice
from prunelab.utils.io import (
    atomic_torch_save,
    atomic_write_json,
    load_torch,
    move_aside,
    read_record,
    torch_archive_error,
)

log = logging.getLogger(__name__)


def is_rank_zero() -> bool:
    return getattr(rank_zero_only, "rank", 0) == 0


def compacted_sparsity(params_before: int, params_after: int, model: nn.Module, masks: MaskSet | None,
                       input_shape) -> dict[str, Any]:
    """Direct and effective sparsity of a compacted model against the dense one (``params/total``,
    ``params/remaining``, ``sparsity/...``, ``compression/...``, ``layer_collapse``).

    Without ``masks`` every pruned unit was removed: the model is dense, and since a compaction never removes
    every unit of a layer, every remaining weight lies on an input -> output path; both sparsities are the
    fraction of the parameters removed. ``masks`` (over ``model``'s parameters) hold the pruned units the
    compaction kept, zero: units a residual addition still reads, and the one unit a layer keeps when every
    one of its units was pruned. Their entries count as removed (direct), and the effective sparsity follows
    the paths through the unmasked conv / linear weights (:func:`~prunelab.pruning.effective.
    effective_sparsity_report`). When no input -> output path is left (a layer of a plain chain whose units
    were all pruned; in a residual network a shortcut may keep the path) the network is recorded as collapsed
    (``layer_collapse``, effective sparsity 1, compression inf), not as a ``1 - after / before`` that the kept
    zero unit would make look connected (a model with attention: direct = effective, as that report gives)."""
    remaining = effective = params_after
    collapse = False
    if masks is not None:
        remaining -= masks.numel() - masks.remaining()
        full = {n: masks[n] if n in masks else m for n, m in MaskSet.from_model(model).items()}
        eff = effective_sparsity_report(model, full, input_shape)
        collapse = bool(eff["layer_collapse"])
        effective = 0 if collapse else remaining - (eff["remaining"] - eff["effective_remaining"])
    return {
        "params/total": params_before, "params/remaining": remaining,
        "sparsity/direct": 1.0 - remaining / params_before,
        "compression/direct": params_before / remaining if remaining else math.inf,
        "sparsity/effective": 1.0 - effective / params_before,
        "compression/effective": params_before / effective if effective else math.inf,
        "layer_collapse": float(collapse),
    }


@dataclass
class RunContext:
    cfg: DictConfig
    run_dir: Path
    cache_dir: Path
    datamodule: Any
    scorer: Scorer
    allocation: Allocation
    finetune: Finetune
    schedule: Any
    sparsity: float
    loggers: list
    callbacks_cfg: list = field(default_factory=list)
    stages: dict[str, dict] = field(default_factory=dict)
    extra_final: dict[str, Any] = field(default_factory=dict)
    # None for a full run; the debug option (``fdr``, ``limit``, ... or ``trainer.limit_train_batches=2``)
    # of a debug run, whose dense model lives in ``<run_dir>/cache`` (results.json ``debug``)
    debug: str | None = None
    # threads and deterministic flags the run used (results.json ``determinism``)
    determinism: dict[str, Any] = field(default_factory=dict)
    # stage -> the config options of its optimiser (named when the stage diverges)
    stage_options: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.debug = debug_mode(self.cfg)
        self.determinism = self.determinism or determinism_record(self.cfg)

    # model ------------------------------------------------------------------------------------------
    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.datamodule.input_shape)

    @property
    def num_classes(self) -> int:
        return int(self.datamodule.num_classes)

    def build_model(self) -> nn.Module:
        pl.seed_everything(int(self.cfg.seed), workers=True, verbose=False)
        return instantiate(self.cfg.model, input_shape=self.input_shape, num_classes=self.num_classes)

    def new_masks(self, model: nn.Module) -> MaskSet:
        p = self.cfg.prune
        return MaskSet.from_model(
            model, include=list(p.include), exclude_first=bool(p.exclude_first),
            exclude_last=bool(p.exclude_last), exclude=list(p.exclude),
        )

    def score_batches(self) -> list:
        if not self.scorer.needs_data:
            return []
        p = self.cfg.prune
        return self.datamodule.score_batches(int(p.score_batches), p.score_batch_size)

    # training ---------------------------------------------------------------------------------------
    def trainer(self, epochs: int, ckpt_dir: Path | None = None, callbacks: list | None = None) -> pl.Trainer:
        callbacks = [instantiate(c) for c in self.callbacks_cfg] + list(callbacks or [])
        if ckpt_dir is not None:
            # no monitor + save_top_k=1: the latest epoch, overwritten each epoch, as ``last.ckpt``
            callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="last", save_top_k=1,
                                             every_n_epochs=1, enable_version_counter=False))
        if self.cfg.trainer.get("enable_progress_bar", True):
            callbacks.append(StageProgressBar(leave=False))
        return instantiate(
            self.cfg.trainer, max_epochs=int(epochs), logger=self.loggers or False, callbacks=callbacks,
            enable_checkpointing=ckpt_dir is not None, default_root_dir=str(self.run_dir),
        )

    def module(self, model: nn.Module, stage: str, optimizer, scheduler, masks: MaskSet | None = None,
               extra_loss=None, hook=None) -> PruneModule:
        options = self._options_of(optimizer, stage)
        if options is not None:
            self.stage_options[stage] = options
        return PruneModule(model, self.num_classes, OmegaConf.to_container(optimizer, resolve=True)
                           if OmegaConf.is_config(optimizer) else dict(optimizer),
                           OmegaConf.to_container(scheduler, resolve=True)
                           if OmegaConf.is_config(scheduler) else dict(scheduler),
                           stage=stage, masks=masks, extra_loss=extra_loss, hook=hook,
                           options=options or f"the optimizer options of stage {stage}",
                           accel=OmegaConf.to_container(self.cfg.accel) if "accel" in self.cfg else None)

    def _options_of(self, optimizer, stage: str) -> str | None:
        """The config path of an optimiser's options (``pretrain.optimizer``, ``finetune.optimizer``), if known."""
        if OmegaConf.is_config(optimizer):
            key = optimizer._get_full_key(None)
            if key:
                return str(key)
        if optimizer is getattr(self.finetune, "optimizer", None):
            return "finetune.optimizer"
        return None

    def advice(self, stage: str) -> str:
        """What to change when ``stage`` produced a non-finite model."""
        return optimizer_advice(self.stage_options.get(stage, f"the optimizer options of stage {stage}"))

    def fit(self, module: PruneModule, epochs: int, ckpt_dir: Path, callbacks: list | None = None) -> float:
        """Train ``module`` for ``epochs``, checkpointing every epoch into ``ckpt_dir`` and resuming from
        ``ckpt_dir/last.ckpt`` when an earlier attempt was interrupted. Returns the wall time."""
        start = time.perf_counter()
        if epochs <= 0:
            return 0.0
        last = ckpt_dir / "last.ckpt"
        trainer = self.trainer(epochs, ckpt_dir, callbacks)
        resume = last.exists()
        if resume and (reason := torch_archive_error(last)) is not None:
            if is_rank_zero():  # never loaded: the stage starts over
                move_aside(last, f"epoch checkpoint: {reason}")
            resume = False
        if resume:
            log.info("%s: resuming from %s", module.stage, last)
        try:
            trainer.fit(module, datamodule=self.datamodule, ckpt_path=str(last) if resume else None)
        finally:  # Lightning calls no module hook when a fit raises: hand the model back uncompiled anyway
            release(module.model)
        if trainer.interrupted:  # Lightning turns Ctrl-C into a graceful stop: the stage is not done
            raise KeyboardInterrupt(f"{module.stage} interrupted; re-run the same command to resume")
        return time.perf_counter() - start

    def evaluate(self, model: nn.Module, stage: str, masks: MaskSet | None = None) -> dict[str, float]:
        """Test accuracy and loss of ``model`` (``<stage>/test/acc``, ``<stage>/test/loss``)."""
        module = self.module(model, stage, {"name": "sgd", "lr": 0.0}, {"name": "constant"}, masks)
        trainer = self.trainer(1)
        out = trainer.test(module, datamodule=self.datamodule, verbose=False)
        return {k: float(v) for k, v in out[0].items()} if out else {}

    # sparsity ---------------------------------------------------------------------------------------
    def sparsity_metrics(self, model: nn.Module, masks: MaskSet, stage: str) -> dict[str, Any]:
        # Effective sparsity follows paths of non-zero weights: with NaN weights it would report "layer
        # collapse" (and sparsity 1.0) for a model that is merely broken.
        check_finite_model(model, f"{stage}: the model", self.advice(stage))
        eff = effective_sparsity_report(model, masks, self.input_shape)
        flops = masked_flops(model, self.input_shape, masks)
        total = count_params(model)
        removed = masks.numel() - masks.remaining()
        metrics = {
            f"{stage}/sparsity/direct": masks.sparsity(),
            f"{stage}/compression/direct": masks.compression(),
            f"{stage}/sparsity/effective": eff["sparsity_effective"],
            f"{stage}/compression/effective": eff["compression_effective"],
            f"{stage}/layer_collapse": float(eff["layer_collapse"]),
            f"{stage}/params/total": total,
            f"{stage}/params/remaining": total - removed,
            f"{stage}/flops/dense": flops["flops_dense"],
            f"{stage}/flops/remaining": flops["flops_remaining"],
        }
        layers = {row["name"]: row["effective_remaining"] for row in eff["layers"]}
        return {"metrics": metrics, "layers_effective": layers}

    def cost(self, model: nn.Module) -> dict[str, float]:
        """Parameters, FLOPs (batch 1) and, with ``measure.latency``, CPU latency per batch size of a plain
        (dense or compacted) model: median and IQR in ms and the thread count (``benchmark_latency``).
        Latency is measured on a CPU copy: the figure the structured-pruning benchmarks compare against the
        FLOPs ratio."""
        m = self.cfg.measure
        out: dict[str, float] = {"params": count_params(model), "flops": count_flops(model, self.input_shape)}
        if m.latency:
            on_cpu = all(p.device.type == "cpu" for p in model.parameters())
            cpu_model = model if on_cpu else copy.deepcopy(model).cpu()  # timing does not modify the model
            out.update(benchmark_latency(cpu_model, self.input_shape, batch_sizes=list(m.batch_sizes),
                                         warmup=int(m.warmup), repeats=int(m.repeats), threads=m.threads,
                                         min_run_time=float(m.get("min_run_time", 0.2))))
        return out

    def structure_metrics(self, before: dict[str, float], after: dict[str, float], stage: str,
                          model: nn.Module | None = None, masks: MaskSet | None = None) -> dict[str, Any]:
        """``<stage>/params/total|remaining``, ``<stage>/flops/dense|remaining``, ``<stage>/sparsity/direct|
        effective``, ``<stage>/compression/direct|effective`` and ``<stage>/layer_collapse`` (read by the
        ``final`` block like the unstructured ones), and ``<stage>/structure/<cost>_before|_after`` plus the
        FLOPs reduction ratio and, when latency was measured, per batch size ``speedup_b<B>`` (median before /
        median after) and ``speedup_spread_b<B>`` (its relative spread), ``latency_threads``, and
        ``speedup_plausible`` / ``latency_warning`` from :func:`~prunelab.metrics.latency.check_speedup` (a
        warning is logged). ``model``, ``masks``: the compacted model and the pruned units it still holds
        (:func:`~prunelab.pruning.units.compact.compact_units`); see :func:`compacted_sparsity`."""
        s = f"{stage}/structure"
        flops_ratio = before["flops"] / max(1, after["flops"])
        out: dict[str, Any] = {
            f"{stage}/flops/dense": before["flops"], f"{stage}/flops/remaining": after["flops"],
            f"{s}/flops_ratio": flops_ratio, f"{s}/params_ratio": before["params"] / max(1, after["params"])}
        sp = compacted_sparsity(before["params"], after["params"], model, masks,
                                self.input_shape if masks is not None else None)
        out.update({f"{stage}/{k}": v for k, v in sp.items()})
        for key in before:
            if key == "latency_threads":
                out[f"{s}/latency_threads"] = before[key]
                continue
            out[f"{s}/{key}_before"] = before[key]
            out[f"{s}/{key}_after"] = after[key]
        unchanged = before["flops"] == after["flops"] and before["params"] == after["params"]
        problems = []
        for key in before:
            if not key.startswith("latency_ms_b"):
                continue
            b = key[len("latency_ms_"):]
            speedup = before[key] / max(after[key], 1e-9)
            spread = relative_spread(before[key], before[f"latency_iqr_ms_{b}"], after[key],
                                     after[f"latency_iqr_ms_{b}"])
            out[f"{s}/speedup_{b}"] = speedup
            out[f"{s}/speedup_spread_{b}"] = spread
            reason = check_speedup(speedup, spread, flops_ratio, unchanged)
            if reason is not None:
                problems.append(f"batch {b[1:]}: {reason}")
        if any(k.startswith("latency_ms_b") for k in before):
            out[f"{s}/speedup_plausible"] = not problems
            out[f"{s}/latency_warning"] = "; ".join(problems) if problems else None
            if problems:
                log.warning("%s: implausible latency figures (%s threads): %s", stage,
                            before.get("latency_threads"), "; ".join(problems))
        return out

    def log_metrics(self, metrics: dict[str, float]) -> None:
        # NaN never reaches a logger (a non-finite run stops first); inf does: a collapsed network's effective
        # compression is logged as infinite, not dropped
        numbers = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and v == v}
        for lg in self.loggers:
            lg.log_metrics(numbers)

    # artefacts --------------------------------------------------------------------------------------
    def stage_path(self, stage: str, suffix: str) -> Path:
        return self.run_dir / "stages" / f"{stage}.{suffix}"

    def load_done(self, stage: str, record_keys: tuple[str, ...] = (),
                  state_keys: tuple[str, ...] = ("model", "masks")) -> tuple[dict, dict] | None:
        """``(record, state)`` of a stage finished earlier, or None: not run, or its files cannot be trusted.
        The record (``stages/<stage>.json``) must hold ``metrics.<stage>/test/acc`` and ``record_keys``, the
        state (``<stage>.pt``) must be an intact archive holding ``state_keys``. A damaged state is moved
        aside (never loaded), an invalid record is reported; the stage then runs again."""
        rec_file, state_file = self.stage_path(stage, "json"), self.stage_path(stage, "pt")
        if not (rec_file.exists() and state_file.exists()):
            return None
        record = read_record(rec_file, (f"metrics.{stage}/test/acc", *record_keys), what="stage record")
        if record is None:
            return None
        # stage states hold pickled modules (compacted networks): weights_only=False, on checksummed bytes
        state = load_torch(state_file, weights_only=False, move=is_rank_zero(), required=state_keys,
                           what="stage state")
        if state is None:
            return None
        log.info("%s: loaded from %s", stage, rec_file)
        return record, state

    def save_stage(self, stage: str, record: dict, model: nn.Module | None, masks: MaskSet | None,
                   extra: dict | None = None) -> None:
        if model is not None:
            check_finite_model(model, f"{stage}: the trained model", self.advice(stage))
        self.stages[stage] = record
        if not is_rank_zero():
            return
        state = {"model": model.state_dict() if model is not None else None,
                 "masks": masks.state_dict() if masks is not None else None, **(extra or {})}
        atomic_torch_save(state, self.stage_path(stage, "pt"))
        atomic_write_json(record, self.stage_path(stage, "json"))

    # dense cache --------------------------------------------------------------------------------------
    def dense_identity(self) -> dict[str, Any]:
        """What the dense model depends on (:func:`prunelab.pipeline.cache.dense_identity`), with the data
        module's file fingerprint when it has one."""
        return dense_identity(self.cfg, data_fingerprint(self.datamodule))

    def dense_key(self) -> str:
        return dense_key(self.dense_identity())

    def dense_entry(self) -> DenseEntry:
        return DenseEntry(self.cache_dir, self.dense_identity())

    def dense_dir(self) -> Path:
        return self.dense_entry().dir

    def clone(self, model: nn.Module) -> nn.Module:
        return copy.deepcopy(model)
