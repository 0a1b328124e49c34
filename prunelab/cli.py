"""The ``prunelab`` command: a Hydra app over ``conf/``.

    prunelab                                   # the default run (digits, LeNet-300-100, magnitude, 90%)
    prunelab model=lenet5 data=mnist prune.sparsity=0.98
    prunelab --multirun method=magnitude,random prune.sparsity=0.5,0.9
    prunelab --cfg job                         # print the composed config
"""

from __future__ import annotations

import logging
import os
import traceback
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig

from prunelab.config import register_configs, register_resolvers

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
if not Path(CONFIG_DIR).is_dir():  # installed without the repo: configs shipped inside the package
    CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")

register_configs()
register_resolvers()
log = logging.getLogger("prunelab")


def quiet_lightning() -> None:
    """Lightning's INFO banners (GPU available, tips, 'fit stopped') drown the run's own log."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("lightning", "pytorch_lightning")):
            logging.getLogger(name).setLevel(logging.WARNING)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _main(cfg: DictConfig) -> float | None:
    from prunelab.pipeline.run import objective, run_pipeline
    from prunelab.report.summary import print_summary

    quiet_lightning()
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    if not _is_multirun():
        results = run_pipeline(cfg)
        print_summary(results)
        return objective(results, cfg)  # a validation metric (optimized_metric), never test accuracy
    # In a sweep a failing job must not stop the others: its traceback goes to <job dir>/error.txt and the
    # log, and the sweep goes on (re-running the sweep retries it).
    try:
        results = run_pipeline(cfg)
    except Exception:
        trace = traceback.format_exc()
        log.error("job failed:\n%s", trace)
        try:
            out = Path(cfg.paths.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "error.txt").write_text(trace)
        except OSError:
            pass
        return float("nan")
    error_file = Path(cfg.paths.output_dir) / "error.txt"
    if error_file.exists():
        error_file.unlink()
    print_summary(results)
    return objective(results, cfg)  # a validation metric (optimized_metric), never test accuracy


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def main() -> None:
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    _main()


if __name__ == "__main__":
    main()
