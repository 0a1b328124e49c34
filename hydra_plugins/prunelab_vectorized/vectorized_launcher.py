"""``hydra/launcher=vectorized`` (or the overlay ``experiment=vectorized``): run a multirun in one process
with the training stages of its jobs vectorised (:mod:`prunelab.vectorized`).

Every job gets what Hydra's basic launcher gives it (its sweep config, output folder, ``.hydra/`` files,
its ``JobReturn`` with the test accuracy as return value); then all jobs run through
:func:`prunelab.vectorized.run_vectorized`, and each job's Hydra record is settled as ``run_pipeline``
settles it in a normal job (:func:`_settle_hydra_files`: moved into ``.hydra/`` once the run owns its folder). A job outside the vectorised scope runs the normal way through
Hydra's ``run_job`` after the others (the reason is logged); a failing job writes ``error.txt`` and returns
NaN, as ``prunelab --multirun`` does. This module imports no torch: Hydra imports every plugin at start-up.
"""

# no "from __future__ import annotations": Hydra execs plugin modules outside sys.modules, where dataclasses
# cannot resolve string annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


@dataclass
class VectorizedLauncherConf:
    _target_: str = "hydra_plugins.prunelab_vectorized.vectorized_launcher.VectorizedLauncher"
    max_copies: Optional[int] = None  # noqa: UP045 - Hydra's structured configs need typing.Optional


ConfigStore.instance().store(group="hydra/launcher", name="vectorized", node=VectorizedLauncherConf,
                             provider="prunelab")


def _resolved(cfg: DictConfig) -> DictConfig:
    """The job's config with every interpolation resolved now, while Hydra's config is the job's own
    (``${hydra:runtime.output_dir}`` and the run id are per job; the jobs then run side by side), and with
    the pruning target resolved first from the job's own command-line keys, as ``run_pipeline`` does (the
    run's hash, hence its folder claim, must be the one a normal run of the job computes)."""
    from prunelab.config import apply_prune_target

    apply_prune_target(cfg)
    OmegaConf.resolve(cfg)
    return cfg


def _settle_hydra_files(ret: JobReturn, status: str, cfg: DictConfig) -> None:
    """What ``run_pipeline`` does with Hydra's record of a job (written to ``hydra.output_subdir``, a
    pending folder) in a normal job, done here with the job's own Hydra config: a job that ran (``done``)
    or failed in a folder it claimed adopts it as ``.hydra/``; a ``skipped`` job, or one refused before it
    claimed its folder, discards it (:func:`prunelab.pipeline.run.discard_hydra_files`). A job that falls
    back is settled by its normal run."""
    from hydra.core.hydra_config import HydraConfig

    from prunelab.config import identity, stable_hash
    from prunelab.pipeline.run import adopt_hydra_files, discard_hydra_files
    from prunelab.utils.io import read_record

    if status == "fallback" or ret.hydra_cfg is None:
        return
    own = status == "done"
    if status == "failed":
        claim = read_record(Path(cfg.paths.output_dir) / "run.json", ("run_id",), what="run record")
        own = claim is not None and claim["run_id"] == stable_hash(identity(cfg))
    previous = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(ret.hydra_cfg)
    try:
        adopt_hydra_files() if own else discard_hydra_files()
    finally:
        HydraConfig.instance().cfg = previous


class VectorizedLauncher(Launcher):
    def __init__(self, max_copies: int | None = None) -> None:
        super().__init__()
        self.max_copies = max_copies
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def _run_job(self, sweep_config: DictConfig, task_function) -> JobReturn:
        return run_job(hydra_context=self.hydra_context, task_function=task_function, config=sweep_config,
                       job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")

    def launch(self, job_overrides, initial_job_idx: int) -> list[JobReturn]:
        from prunelab.cli import quiet_lightning
        from prunelab.report.summary import print_summary
        from prunelab.vectorized import run_vectorized

        setup_globals()
        assert self.hydra_context is not None and self.config is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info(f"Launching {len(job_overrides)} jobs vectorised")
        quiet_lightning()
        sweep_configs, rets = [], []
        for idx, overrides in enumerate(job_overrides):
            idx = initial_job_idx + idx
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = idx
                sweep_config.hydra.job.num = idx
            # the job's folder, .hydra/ files and JobReturn as the basic launcher makes them; the task
            # function here only hands back the job's resolved config
            rets.append(self._run_job(sweep_config, _resolved))
            sweep_configs.append(sweep_config)
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        cfgs = [ret.return_value for ret in rets]
        outcomes = run_vectorized(cfgs, max_copies=self.max_copies)
        runs: list[JobReturn] = []
        for ret, sweep_config, out in zip(rets, sweep_configs, outcomes):
            _settle_hydra_files(ret, out.status, out.cfg)
            if out.status == "fallback":  # run_vectorized logged the reason
                runs.append(self._run_job(sweep_config, self.task_function))
                configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
                continue
            error_file = Path(out.cfg.paths.output_dir) / "error.txt"
            if out.status == "failed":  # as prunelab --multirun: error.txt, NaN, the sweep goes on
                log.error("job failed:\n%s", out.error)
                try:
                    error_file.parent.mkdir(parents=True, exist_ok=True)
                    error_file.write_text(out.error or "")
                except OSError:
                    pass
                ret.return_value = float("nan")
            else:
                if error_file.exists():
                    error_file.unlink()
                print_summary(out.results)
                acc = out.results["final"].get("test_acc")
                ret.return_value = math.nan if acc is None else acc
            ret.status = JobStatus.COMPLETED
            runs.append(ret)
        return runs
