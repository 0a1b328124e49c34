"""What a run says while it runs: one banner line when a stage starts, one line with each stage's result,
the final metrics in the log file (``<run dir>/prunelab.log``, Hydra's job log), all on global rank 0 only.

A SLURM or nohup job's log thus tells which stage is running and what every finished stage measured;
``CURRENT`` remembers the stage and run folder, so an interrupted run can say what was interrupted.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from prunelab.pipeline.context import is_rank_zero

log = logging.getLogger("prunelab")

# The stage running now and the run's folder (read by the CLI when the run is interrupted).
CURRENT: dict[str, Any] = {"stage": None, "run_dir": None}


def banner(stage: str, detail: str = "") -> None:
    """``== <stage>: <detail> ==`` when a stage starts."""
    CURRENT["stage"] = stage
    if is_rank_zero():
        log.info("== %s%s ==", stage, f": {detail}" if detail else "")


def choice(group: str, default: str) -> str:
    """The option chosen for a config group (``magnitude`` for ``method=magnitude``), else ``default``."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return str(HydraConfig.get().runtime.choices.get(group) or default)
    return default


def epochs(n: int) -> str:
    return f"{int(n)} epoch{'' if int(n) == 1 else 's'}"


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.4g}"
    return str(v)


def stage_result(stage: str, record: dict[str, Any]) -> str:
    """One line: a stage's test accuracy and loss, sparsity (direct / effective), time, and whether it came
    from the cache or an earlier attempt's record."""
    m = record.get("metrics", {}) if isinstance(record, dict) else {}
    parts = []
    for key, label in (("test/acc", "test acc"), ("test/loss", "test loss"), ("sparsity/direct", "sparsity"),
                       ("sparsity/effective", "effective sparsity"), ("structure/flops_ratio", "FLOPs ratio")):
        if f"{stage}/{key}" in m:
            parts.append(f"{label} {_fmt(m[f'{stage}/{key}'])}")
    t = m.get(f"{stage}/train_time_s", m.get(f"{stage}/time_s", record.get("train_time_s")))
    if isinstance(t, (int, float)):
        parts.append(f"{t:.1f} s")
    if record.get("recipe"):
        parts.append(f"recipe {record['recipe']}")
    if record.get("cached"):
        parts.append("from the dense cache")
    return f"{stage} done: " + (", ".join(parts) if parts else "no metrics")


class StageLog(dict):
    """``RunContext.stages``: every stage record set in it (trained, loaded from the cache or from an earlier
    attempt) is logged as one line."""

    def __setitem__(self, stage: str, record: dict) -> None:
        if self.get(stage) is not record and is_rank_zero():
            log.info("%s", stage_result(stage, record))
        super().__setitem__(stage, record)


def log_to_file(message: str, logger: logging.Logger = log) -> None:
    """Write ``message`` to the log files only (the console shows the same as a table)."""
    if not is_rank_zero():
        return
    record = logger.makeRecord(logger.name, logging.INFO, __file__, 0, message, None, None)
    for lg in (logger, logging.getLogger()):
        for h in lg.handlers:
            if isinstance(h, logging.FileHandler):
                h.handle(record)


def final_block(results: dict[str, Any]) -> str:
    lines = [f"final metrics ({results.get('results_file', 'results.json')}):"]
    for k, v in results.get("final", {}).items():
        if v is not None:
            lines.append(f"  {k}: {_fmt(v)}")
    return "\n".join(lines)
