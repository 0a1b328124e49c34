"""Sweeps (``--multirun``): each job's outcome, the table at the end, the index of job folders, and the
launcher's worker processes stopped with the sweep.

Layout of a sweep (``conf/config.yaml``, ``hydra.sweep``)::

    outputs/multirun/<name>/<sweep id>/           one folder per sweep: a hash of the sweep's overrides, so
        sweep.json                                re-running the same command finds it (finished jobs are
        index.json                                skipped, interrupted ones resume)
        <swept values>__<run id>/                 one folder per job, e.g. method=snip,seed=1__8c5094df9e
        .prunelab/jobs/<job num>.json             the outcome of each job of the latest invocation

Each job records its outcome (``done``, ``skipped``: finished earlier, ``failed``: with the first line of
its error) in the sweep folder; at the end of the sweep the main process prints one table of them, merges
them into ``index.json`` (job folder -> overrides, status, error) and the CLI exits 1 if any job failed.
Launchers that run jobs in other processes (joblib) write the same records, since they share the folder.

This module imports neither torch nor Lightning: the CLI's main process loads it for every command.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("prunelab")

STATUS_DIR = Path(".prunelab") / "jobs"
MAIN_PID_ENV = "PRUNELAB_MAIN_PID"  # set by the CLI's main process; a launcher's workers inherit it

# The summary of the last sweep that ended in this process (the CLI exits 1 when a job failed).
LAST: dict[str, Any] | None = None


def _write_json(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def first_line(error: BaseException | str) -> str:
    """The line of an error that says what went wrong: a user error's message, or ``Type: message``."""
    from prunelab.errors import UserError

    if isinstance(error, BaseException):
        text = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
    else:
        text = str(error)
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[0] if lines else ""


# -- in a job -----------------------------------------------------------------------------------------------
def record_job(status: str, error: BaseException | str | None = None, results: dict | None = None) -> None:
    """Record this job's outcome in its sweep folder (``status``: done, skipped or failed)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    job_dir = Path(hc.runtime.output_dir)
    sweep_dir = Path(hc.sweep.dir).resolve()
    try:
        folder = str(job_dir.resolve().relative_to(sweep_dir))
    except ValueError:
        folder = str(job_dir)
    rec = {"num": int(hc.job.num), "dir": folder, "overrides": [str(o) for o in hc.overrides.task],
           "status": status, "error": first_line(error) if error is not None else None}
    if results is not None:
        rec["test_acc"] = results.get("final", {}).get("test_acc")
    try:
        _write_json(rec, sweep_dir / STATUS_DIR / f"{rec['num']}.json")
    except OSError as e:  # the table then misses this job; the job's own files are what counts
        log.warning("could not record the job's status in %s: %s", sweep_dir / STATUS_DIR, e)


_watchdog_started = False


def watch_main_process(poll_s: float = 1.0) -> None:
    """In a launcher's worker process (joblib/loky): stop this process when the sweep's main process is gone
    (killed, even with SIGKILL), so no orphaned worker goes on writing into job folders that a re-run of the
    sweep uses. A no-op in the main process itself (the basic launcher)."""
    global _watchdog_started
    main_pid = os.environ.get(MAIN_PID_ENV)
    # The CLI's main() sets MAIN_PID_ENV to its own pid, so a process with another value was started by a
    # launcher without going through main(): a worker of the sweep's main process.
    if _watchdog_started or not main_pid or int(main_pid) == os.getpid():
        return
    _watchdog_started = True
    parent = int(main_pid)

    def stop() -> None:
        log.error("the sweep's main process (pid %d) is gone: stopping this worker (pid %d); re-run the sweep "
                  "to resume its jobs", parent, os.getpid())
        for h in logging.getLogger().handlers:
            h.flush()
        os._exit(1)

    if os.getppid() != parent:  # orphaned before this job started
        stop()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        stop()

    threading.Thread(target=watch, name="prunelab-watch-main", daemon=True).start()


# -- in the main process ------------------------------------------------------------------------------------
def stop_workers() -> None:
    """Terminate the joblib launcher's loky workers, if any were started in this process."""
    mod = sys.modules.get("joblib.externals.loky.reusable_executor")
    executor = getattr(mod, "_executor", None) if mod is not None else None
    if executor is not None:
        executor.shutdown(wait=False, kill_workers=True)


def install_signal_handlers() -> None:
    """SIGTERM / SIGHUP of the main process (``kill``, a closed terminal, a scheduler) stop the launcher's
    workers with it, then exit with the conventional status 128 + signal."""

    def handler(signum, frame):
        stop_workers()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            signal.signal(sig, handler)
        except (ValueError, OSError):  # not the main thread, or not supported here
            pass


def read_statuses(sweep_dir: Path) -> list[dict[str, Any]]:
    out = []
    for p in sorted((Path(sweep_dir) / STATUS_DIR).glob("*.json"), key=lambda p: int(p.stem) if p.stem.isdigit() else 0):
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    return out


def summarize(sweep_dir: Path) -> dict[str, Any]:
    jobs = read_statuses(sweep_dir)
    counts = {s: sum(j["status"] == s for j in jobs) for s in ("done", "skipped", "failed")}
    return {"sweep_dir": str(sweep_dir), "jobs": jobs, **counts}


def print_summary(summary: dict[str, Any], max_rows: int = 40) -> None:
    """One table: every failed job, and the others while the sweep is small; then the counts."""
    from rich.console import Console
    from rich.table import Table

    jobs = summary["jobs"]
    rows = jobs if len(jobs) <= max_rows else [j for j in jobs if j["status"] == "failed"]
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 160))
    if rows:
        table = Table(title=f"sweep {summary['sweep_dir']}", show_header=True, header_style="bold")
        for col in ("status", "job folder", "error (first line)"):
            table.add_column(col, overflow="fold")
        for j in rows:
            table.add_row(j["status"], j["dir"], j.get("error") or "")
        console.print(table)
    console.print(f"sweep {summary['sweep_dir']}: {len(jobs)} jobs: {summary['done']} done, "
                  f"{summary['skipped']} skipped (finished earlier), {summary['failed']} failed"
                  + (" (their tracebacks: <job folder>/error.txt)" if summary["failed"] else ""))


def write_index(sweep_dir: Path, summary: dict[str, Any]) -> None:
    """``index.json``: every job folder of the sweep -> its overrides, latest status and error."""
    path = Path(sweep_dir) / "index.json"
    index: dict[str, Any] = {}
    if path.exists():
        try:
            index = json.loads(path.read_text()).get("jobs", {})
        except (OSError, ValueError):
            index = {}
    for j in summary["jobs"]:
        index[j["dir"]] = {"overrides": j["overrides"], "status": j["status"], "error": j.get("error")}
    _write_json({"jobs": dict(sorted(index.items()))}, path)


class SweepCallback(Callback):
    """Registered in ``conf/config.yaml`` (``hydra.callbacks``): bookkeeping of a ``--multirun``."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from prunelab.config import sweep_info

        global LAST
        LAST = None
        sweep_dir = Path(str(config.hydra.sweep.dir))
        shutil.rmtree(sweep_dir / STATUS_DIR, ignore_errors=True)  # statuses of this invocation only
        info = sweep_info(config)
        _write_json({"sweep_id": info["id"], "overrides": info["overrides"], "varying": info["varying"],
                     "cwd": os.getcwd(), "command": ["prunelab", *sys.argv[1:]]},
                    sweep_dir / "sweep.json")
        install_signal_handlers()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global LAST
        sweep_dir = Path(str(config.hydra.sweep.dir))
        summary = summarize(sweep_dir)
        print_summary(summary)
        write_index(sweep_dir, summary)
        LAST = summary
