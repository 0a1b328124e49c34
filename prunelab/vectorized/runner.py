"""Run many jobs of a sweep with their training stages vectorised, everything else by the pipeline itself.

How (the *replay* design): every copy runs :func:`prunelab.pipeline.run.run_pipeline` on its own config,
with its :class:`RunContext` replaced by a :class:`ReplayContext` whose only difference is ``fit``:

- the first time a copy reaches a training stage (pretraining, fine-tuning) its ``fit`` does not train:
  it records what the stage would train (the module at its initial weights, masks, recipe, the copy's data)
  and stops the copy (:class:`NeedTraining`);
- once every copy has stopped, the recorded stages are grouped (same architecture, recipe, steps, device),
  deduplicated (copies sharing a dense pretraining, e.g. one seed at two sparsities, train it once) and each
  group is trained as one stacked model (:func:`prunelab.vectorized.train.train_group`);
- every copy then runs again from the top. The pipeline reloads what it already did from its own records
  (the dense cache, ``stages/<stage>.json|pt``), and when it reaches the fit again, ``fit`` finds the trained
  weights under the stage's *fingerprint* (a hash of the module's initial weights and masks, recipe, epochs
  and the data config; :func:`fingerprint`) and loads them in place of the Lightning fit. A stage whose
  inputs differ in any way from what was trained has another fingerprint and is never replayed.

So the dense cache (key: ``RunContext.dense_key``), scoring, masks, evaluation, stage records and
``results.json`` are written by the pipeline's own code, as in a separate run: a separate run reuses the
dense models a vectorised sweep cached and vice versa. The only differences in a copy's outputs: its
``train_time_s`` is the group's wall time divided by the copies, ``wall_time_s`` covers the last pass, and
``vectorized.json`` in the run folder records the groups its stages were trained in (``vectorized: true``
and, per stage trained so, its group): the proof that a copy's stages were not trained the normal way.

Validation: the vectorised loop validates every copy after every epoch as Lightning would
(:func:`prunelab.vectorized.train.validate`); on replay the stage's own callbacks get the results the
Lightning loop would have given them: its :class:`~prunelab.pipeline.tracking.ValidationTracker` the
per-epoch accuracy and loss (so the record holds ``<stage>/val/acc_best`` etc.), and its keep-best
``ModelCheckpoint`` (``finetune.keep_best``) the best epoch, written where it would have saved it
(:func:`_replay_callbacks`); the logger gets the per-epoch training and validation metrics.

A fit that cannot be vectorised (any other Lightning callback, a training hook or extra loss, a model with
batch statistics, a stage resuming from a checkpoint) runs the normal way inside the copy's pipeline, with a
log line; a job outside the scope (:func:`why_not`) is returned as ``fallback`` for the caller to run
normally.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from prunelab.config import identity
from prunelab.pipeline.context import RunContext
from prunelab.pipeline.tracking import ValidationTracker
from prunelab.training.hooks import TrainHook
from prunelab.utils.io import atomic_torch_save, atomic_write_json, read_json
from prunelab.vectorized.stacked import unsupported_model
from prunelab.vectorized.train import Request, Trained, device_of, group_key, train_group

log = logging.getLogger(__name__)

TRAINER_KEYS = {"_target_", "accelerator", "devices", "num_nodes", "strategy", "precision", "enable_progress_bar",
                "log_every_n_steps", "deterministic", "limit_train_batches", "limit_val_batches",
                "limit_test_batches", "num_sanity_val_steps", "enable_model_summary", "benchmark"}
MAX_PASSES = 16


class NeedTraining(BaseException):  # noqa: N818 - control flow, like GeneratorExit: never caught as an error
    """Raised by :meth:`ReplayContext.fit` to stop a copy at a stage that has not been trained yet."""

    def __init__(self, request: Request):
        super().__init__(request.module.stage)
        self.request = request


@dataclass
class Outcome:
    """What became of one job: ``done`` (results written), ``skipped`` (already finished earlier),
    ``failed`` (its own error, ``error`` holds the traceback) or ``fallback`` (not vectorisable:
    ``reason``; the caller runs it the normal way)."""

    cfg: DictConfig
    status: str
    results: dict | None = None
    error: str | None = None
    reason: str | None = None


@dataclass
class _Shared:
    trained: dict[str, Trained] = field(default_factory=dict)


class _KeepFirst(dict):
    """``ctx.stages`` of a replayed copy: a stage record set by an earlier pass is kept (a later pass only
    reloads it: e.g. the pretraining a pass trained is ``cached: false``, not the ``cached: true`` of its
    reload in the next pass)."""

    def __setitem__(self, key, value):
        if key not in self:
            super().__setitem__(key, value)


def fingerprint(ctx: RunContext, module, epochs: int, keep_best: bool = False) -> str:
    """Hash of everything a training stage's result depends on: stage, epochs, recipe, the data config
    (content, splits and order seed), the batches-per-epoch limits (training and validation), whether it
    keeps its best epoch, the model config and device, the initial weights and the masks (their bytes)."""
    h = hashlib.sha256()
    meta = {"stage": module.stage, "epochs": int(epochs), "optimizer": module.optimizer_cfg,
            "scheduler": module.scheduler_cfg, "data": identity(ctx.cfg, keys=["data", "model"]),
            "limit": ctx.cfg.trainer.get("limit_train_batches"), "device": str(device_of(ctx.cfg)),
            "limit_val": ctx.cfg.trainer.get("limit_val_batches"), "keep_best": bool(keep_best)}
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for name, t in module.model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    if module.masks is not None:
        for name in module.masks:
            h.update(b"mask:" + name.encode())
            h.update(module.masks[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def is_keep_best(module, cb) -> bool:
    """``cb`` is the checkpoint ``train_stage`` attaches for ``finetune.keep_best`` (best validation accuracy
    of this stage, one file): the one ModelCheckpoint whose result the vectorised loop reproduces."""
    return (type(cb) is ModelCheckpoint and cb.monitor == f"{module.stage}/val/acc" and cb.mode == "max"
            and cb.save_top_k == 1 and cb.dirpath is not None)


def fit_unsupported(ctx: RunContext, module, ckpt_dir: Path, callbacks) -> str | None:
    """Why this fit runs the normal way (``None``: it is vectorised). Of the callbacks, the stage's
    :class:`ValidationTracker` and its keep-best checkpoint are vectorised (:func:`_replay_callbacks`)."""
    if ctx.callbacks_cfg:
        return "Lightning callbacks are configured (callbacks=...)"
    for cb in callbacks or []:
        if type(cb) is ValidationTracker and cb.stage == module.stage:
            continue
        if is_keep_best(module, cb):
            continue
        return f"Lightning callback {type(cb).__name__} is attached"
    if type(module.hook) is not TrainHook:
        return f"training hook {type(module.hook).__name__}"
    if module.extra_loss is not None:
        return "an extra loss term (e.g. distillation)"
    if (Path(ckpt_dir) / "last.ckpt").exists():
        return f"resuming an interrupted stage from {Path(ckpt_dir) / 'last.ckpt'}"
    return unsupported_model(module.model)


@dataclasses.dataclass
class ReplayContext(RunContext):
    """A copy's RunContext whose ``fit`` queues (first pass) or replays (later passes) its training."""

    shared: _Shared = dataclasses.field(default_factory=_Shared)

    @classmethod
    def wrap(cls, ctx: RunContext, shared: _Shared) -> ReplayContext:
        init = {f.name: getattr(ctx, f.name) for f in dataclasses.fields(ctx) if f.init}
        out = cls(**init, shared=shared)
        for f in dataclasses.fields(ctx):
            if not f.init:
                setattr(out, f.name, getattr(ctx, f.name))
        out.stages = _KeepFirst(ctx.stages)
        return out

    def fit(self, module, epochs: int, ckpt_dir: Path, callbacks: list | None = None) -> float:
        if epochs <= 0:
            return super().fit(module, epochs, ckpt_dir, callbacks)
        reason = fit_unsupported(self, module, ckpt_dir, callbacks)
        if reason is not None:
            log.info("vectorized: %s of %s trains the normal way: %s", module.stage, self.run_dir, reason)
            return super().fit(module, epochs, ckpt_dir, callbacks)
        keep_best = any(is_keep_best(module, cb) for cb in callbacks or [])
        fp = fingerprint(self, module, epochs, keep_best)
        done = self.shared.trained.get(fp)
        if done is None:
            raise NeedTraining(Request(self, module, int(epochs), fp, keep_best=keep_best))
        _replay_callbacks(module, done, callbacks or [])
        module.model.load_state_dict(done.state)
        for row in done.epoch_metrics:
            row = dict(row)
            step = int(row.pop("step"))
            for lg in self.loggers:
                lg.log_metrics(row, step=step)
        self._record(module.stage, done, fp)
        return done.time_s

    def _record(self, stage: str, done: Trained, fp: str) -> None:
        path = self.run_dir / "vectorized.json"
        rec = read_json(path) if path.exists() else {"stages": {}}
        rec["vectorized"] = True
        rec["stages"][stage] = {"copies": done.copies, "group_train_time_s": done.group_time_s,
                                "train_time_s": done.time_s, "fingerprint": fp[:16],
                                "validated_epochs": len(done.val)}
        atomic_write_json(rec, path)


def _replay_callbacks(module, done: Trained, callbacks: list) -> None:
    """Give the stage's callbacks what the Lightning loop would have given them.

    - :class:`ValidationTracker`: each validated epoch's accuracy and loss, in order (``record``, the method
      its ``on_validation_end`` calls with Lightning's epoch-level values);
    - the keep-best ``ModelCheckpoint``: ``best_model_path``, ``best_model_score`` and the file there, holding
      what ``train_stage`` reads from it: ``state_dict`` (the module's own state dict with the best epoch's
      weights, so ``module.load_state_dict`` restores that epoch) and ``epoch``. Without validation
      (``trainer.limit_val_batches=0``) nothing is saved, as Lightning saves nothing it cannot monitor.

    Leaves ``module.model`` with whatever weights it had (the caller loads the last epoch's)."""
    for cb in callbacks:
        if type(cb) is ValidationTracker:
            for epoch, (acc, loss) in enumerate(done.val):
                cb.record(epoch, acc, loss)
        elif is_keep_best(module, cb) and done.best is not None:
            path = Path(cb.dirpath) / f"{cb.filename or 'best'}{cb.FILE_EXTENSION}"
            path.parent.mkdir(parents=True, exist_ok=True)
            module.model.load_state_dict(done.best.state)
            atomic_torch_save({"state_dict": module.state_dict(), "epoch": done.best.epoch}, path)
            cb.best_model_path = str(path)
            cb.best_model_score = torch.tensor(done.best.score)


def why_not(ctx: RunContext) -> str | None:
    """Why a job cannot run vectorised (``None``: it can). Checked before anything is trained."""
    from prunelab.data.base import TensorDataModule
    from prunelab.finetune.base import Finetune
    from prunelab.pipeline.schedules import AtInit, OneShot
    from prunelab.pruning.method import TrainingMethod

    cfg = ctx.cfg
    if not isinstance(ctx.datamodule, TensorDataModule):
        return f"data={type(ctx.datamodule).__name__} is not held in tensors"
    if getattr(ctx.datamodule, "augment", False):
        return "data.augment=true (augmentation follows the Lightning trainer's epoch)"
    if type(ctx.schedule) not in (OneShot, AtInit):
        return f"schedule={getattr(ctx.schedule, 'name', ctx.schedule)} (vectorised: oneshot, at_init)"
    if isinstance(ctx.scorer, TrainingMethod):
        return f"method={getattr(ctx.scorer, 'name', ctx.scorer)} prunes units (structured)"
    if type(ctx.finetune) is not Finetune:
        return f"finetune={getattr(ctx.finetune, 'name', ctx.finetune)} (vectorised: vanilla)"
    t = cfg.trainer
    extra = sorted(set(t) - TRAINER_KEYS)
    if extra:
        return f"trainer options {extra} are not vectorised"
    if t.get("_target_") not in ("lightning.pytorch.Trainer", "lightning.Trainer", "pytorch_lightning.Trainer"):
        return f"trainer._target_={t.get('_target_')}"
    if str(t.get("devices", 1)) != "1" or int(t.get("num_nodes", 1)) != 1:
        return f"trainer.devices={t.get('devices')} num_nodes={t.get('num_nodes')} (one device only)"
    if str(t.get("strategy", "auto")) not in ("auto", "single_device"):
        return f"trainer.strategy={t.get('strategy')} (one process only)"
    if str(t.get("precision", "32-true")) not in ("32-true", "32"):
        return f"trainer.precision={t.get('precision')} (vectorised: 32-true)"
    if str(t.get("accelerator", "auto")) not in ("cpu", "gpu", "cuda", "auto"):
        return f"trainer.accelerator={t.get('accelerator')}"
    if device_of(cfg).type == "cuda":
        import torch

        if not torch.cuda.is_available():
            return "trainer.accelerator=gpu but no GPU is available"
    return None


@dataclass
class _Job:
    index: int
    cfg: DictConfig
    ctx: ReplayContext
    stages_requested: set = field(default_factory=set)


def run_vectorized(cfgs: list[DictConfig], max_copies: int | None = None) -> list[Outcome]:
    """Run the jobs ``cfgs`` (resolved configs, each with its own ``paths.output_dir``), their training
    stages vectorised; returns one :class:`Outcome` per job, in order. ``max_copies``: most copies per
    stacked model (memory); larger groups are trained in chunks."""
    from prunelab.config import apply_prune_target
    from prunelab.pipeline.run import build_context, finished_results, given_target, run_pipeline

    shared = _Shared()
    outcomes: list[Outcome | None] = [None] * len(cfgs)
    jobs: list[_Job] = []
    for i, cfg in enumerate(cfgs):
        try:
            # as run_pipeline does first: the run's hash (its folder claim, its results) is of the resolved
            # target, so a job that falls back and runs normally finds its folder claimed by itself
            given = given_target(cfg)
            apply_prune_target(cfg)
            done = finished_results(cfg)
            if done is not None:
                log.info("already done: %s (delete it to run again)", done["results_file"])
                outcomes[i] = Outcome(cfg, "skipped", results=done)
                continue
            ctx = build_context(cfg, given)
        except Exception:
            outcomes[i] = Outcome(cfg, "failed", error=traceback.format_exc())
            continue
        reason = why_not(ctx)
        if reason is not None:
            log.info("vectorized: job %d runs the normal way: %s", i, reason)
            outcomes[i] = Outcome(cfg, "fallback", reason=reason)
            continue
        jobs.append(_Job(i, cfg, ReplayContext.wrap(ctx, shared)))

    active = jobs
    for _ in range(MAX_PASSES):
        requests: list[Request] = []
        for job in active:
            try:
                results = run_pipeline(job.cfg, ctx=job.ctx)
                outcomes[job.index] = Outcome(job.cfg, "done", results=results)
            except NeedTraining as need:
                req = need.request
                key = req.module.stage
                if key in job.stages_requested:  # its inputs changed after it was trained: never replay
                    outcomes[job.index] = Outcome(job.cfg, "fallback",
                                                  reason=f"stage {req.module.stage} was not reproducible")
                    continue
                job.stages_requested.add(key)
                req.job = job.index
                requests.append(req)
            except Exception:
                outcomes[job.index] = Outcome(job.cfg, "failed", error=traceback.format_exc())
        if not requests:
            break
        for reason, failed in _train(requests, shared, max_copies):
            for j in failed:
                outcomes[j] = Outcome(cfgs[j], "fallback", reason=reason)
        active = [j for j in active if outcomes[j.index] is None]
    for job in active:
        if outcomes[job.index] is None:
            outcomes[job.index] = Outcome(job.cfg, "fallback", reason=f"not finished after {MAX_PASSES} passes")
    return [o for o in outcomes if o is not None]


def _train(requests: list[Request], shared: _Shared, max_copies: int | None) -> list[tuple[str, list[int]]]:
    """Train the queued stages, grouped and deduplicated; returns (reason, jobs) of groups that failed."""
    unique: dict[str, Request] = {}
    users: dict[str, list[int]] = defaultdict(list)
    for r in requests:
        unique.setdefault(r.fingerprint, r)
        users[r.fingerprint].append(r.job)
    groups: dict[str, list[Request]] = defaultdict(list)
    for r in unique.values():
        groups[group_key(r)].append(r)
    failed = []
    size = max(1, int(max_copies)) if max_copies else None
    for reqs in groups.values():
        for start in range(0, len(reqs), size or len(reqs)):
            chunk = reqs[start:start + size] if size else reqs
            try:
                for r, trained in zip(chunk, train_group(chunk)):
                    shared.trained[r.fingerprint] = trained
            except Exception as e:
                log.warning("vectorized: training %d copies failed; they run the normal way:\n%s", len(chunk),
                            traceback.format_exc())
                failed.append((f"vectorised training failed: {e!r}",
                               [j for r in chunk for j in users[r.fingerprint]]))
    return failed
