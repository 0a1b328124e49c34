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
``train_time_s`` is the group's wall time divided by the copies, ``wall_time_s`` covers the last pass, the
logger gets the per-epoch training loss/accuracy but no per-epoch validation, and ``vectorized.json`` in
the run folder records the groups its stages were trained in.

A fit that cannot be vectorised (Lightning callbacks, a training hook or extra loss, a model with batch
statistics, a stage resuming from a checkpoint) runs the normal way inside the copy's pipeline, with a log
line; a job outside the scope (:func:`why_not`) is returned as ``fallback`` for the caller to run normally.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from prunelab.config import identity
from prunelab.pipeline.context import RunContext
from prunelab.training.hooks import TrainHook
from prunelab.utils.io import atomic_write_json, read_json
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


def fingerprint(ctx: RunContext, module, epochs: int) -> str:
    """Hash of everything a training stage's result depends on: stage, epochs, recipe, the data config
    (content, split and order seed), the batches-per-epoch limit, the model config and device, the initial
    weights and the masks (their bytes)."""
    h = hashlib.sha256()
    meta = {"stage": module.stage, "epochs": int(epochs), "optimizer": module.optimizer_cfg,
            "scheduler": module.scheduler_cfg, "data": identity(ctx.cfg, keys=["data", "model"]),
            "limit": ctx.cfg.trainer.get("limit_train_batches"), "device": str(device_of(ctx.cfg))}
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for name, t in module.model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    if module.masks is not None:
        for name in module.masks:
            h.update(b"mask:" + name.encode())
            h.update(module.masks[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def fit_unsupported(ctx: RunContext, module, ckpt_dir: Path, callbacks) -> str | None:
    """Why this fit runs the normal way (``None``: it is vectorised)."""
    if callbacks or ctx.callbacks_cfg:
        return "Lightning callbacks are attached"
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
        fp = fingerprint(self, module, epochs)
        done = self.shared.trained.get(fp)
        if done is None:
            raise NeedTraining(Request(self, module, int(epochs), fp))
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
        rec["stages"][stage] = {"copies": done.copies, "group_train_time_s": done.group_time_s,
                                "train_time_s": done.time_s, "fingerprint": fp[:16]}
        atomic_write_json(rec, path)


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
    if ctx.finetune.keep_best:
        return "finetune.keep_best=true (needs per-epoch validation checkpoints)"
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


@contextlib.contextmanager
def _pipeline_context(ctx: RunContext):
    """``run_pipeline`` with its context built already (``ctx``): results.json is then assembled by the
    pipeline's own ``run_pipeline``, whatever its keys become."""
    from prunelab.pipeline import run as run_mod

    original = run_mod.build_context
    run_mod.build_context = lambda cfg: ctx
    try:
        yield
    finally:
        run_mod.build_context = original


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
    from prunelab.pipeline.run import build_context, finished_results, run_pipeline

    shared = _Shared()
    outcomes: list[Outcome | None] = [None] * len(cfgs)
    jobs: list[_Job] = []
    for i, cfg in enumerate(cfgs):
        try:
            done = finished_results(cfg)
            if done is not None:
                log.info("already done: %s (delete it to run again)", done["results_file"])
                outcomes[i] = Outcome(cfg, "skipped", results=done)
                continue
            ctx = build_context(cfg)
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
                with _pipeline_context(job.ctx):
                    results = run_pipeline(job.cfg)
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
