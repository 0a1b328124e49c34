"""Sweeps report their outcome: one table of done / skipped / failed jobs, a non-zero exit when a job failed,
one folder per sweep with readable job folders and an index, and the launcher's workers stopped with the
sweep's main process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_cli import FAST, cli_env, prunelab


def sweep_dirs(root: Path) -> list[Path]:
    return sorted(p for p in (root / "outputs" / "multirun" / "default").iterdir() if p.is_dir())


def test_sweep_table_exit_status_folders_and_index(tmp_path):
    args = ["-m", *FAST, "logger=none", "method=magnitude,random", "prune.sparsity=0.5,1.5"]
    out = prunelab(tmp_path, *args, timeout=600)
    assert out.returncode == 1, out.stderr[-3000:]  # two jobs failed
    text = out.stdout
    assert "4 jobs: 2 done, 0 skipped (finished earlier), 2 failed" in text
    (sweep,) = sweep_dirs(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{8}", sweep.name)  # outputs/multirun/<name>/<sweep id>/
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(jobs) == 4
    for job in jobs:  # the swept values and the run hash
        assert re.fullmatch(r"method=(magnitude|random),prune\.sparsity=(0\.5|1\.5)__[0-9a-f]{10}", job), job
        run_json = sweep / job / "run.json"
        if run_json.exists():
            assert json.loads(run_json.read_text())["run_id"] == job.rsplit("__", 1)[1]
    # the table names each failed job's folder and the first line of its error
    failed = [j for j in jobs if "1.5" in j]
    for job in failed:
        assert job in text.replace("\n", "")
    assert text.count("prune.sparsity must be in [0, 1)") >= 2
    index = json.loads((sweep / "index.json").read_text())["jobs"]
    assert sorted(index) == jobs
    assert {index[j]["status"] for j in failed} == {"failed"}
    assert "method=random" in index[jobs[-1]]["overrides"]
    assert json.loads((sweep / "sweep.json").read_text())["varying"] == ["method", "prune.sparsity"]

    # the same sweep again, its arguments in another order: the same sweep folder, finished jobs skipped
    out = prunelab(tmp_path, "-m", *FAST, "logger=none", "prune.sparsity=0.5,1.5", "method=magnitude,random",
                   timeout=600)
    assert out.returncode == 1
    assert "4 jobs: 0 done, 2 skipped (finished earlier), 2 failed" in out.stdout
    assert sweep_dirs(tmp_path) == [sweep]

    # another sweep gets another folder; all its jobs done: exit 0
    out = prunelab(tmp_path, "-m", *FAST, "logger=none", "prune.sparsity=0.5,0.8", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 jobs: 2 done, 0 skipped (finished earlier), 0 failed" in out.stdout
    assert len(sweep_dirs(tmp_path)) == 2


def test_joblib_jobs_share_one_sweep_folder(tmp_path):
    # Each loky worker builds its job's config from the pickled main config: the sweep's id comes with it
    args = ["-m", "experiment=sweep_local", *FAST, "logger=none", "prune.sparsity=0.5,0.8"]
    out = prunelab(tmp_path, *args, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (sweep,) = sweep_dirs(tmp_path)  # not one folder per job
    assert sorted(p.parent.name.split("__")[0] for p in sweep.glob("*/results.json")) == [
        "prune.sparsity=0.5", "prune.sparsity=0.8"]
    assert "2 jobs: 2 done, 0 skipped (finished earlier), 0 failed" in out.stdout


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc to find the worker processes")
def test_killing_a_joblib_sweep_stops_its_workers(tmp_path):
    # Long enough jobs (pretraining is still running when the main process is killed with SIGKILL, which it
    # cannot handle): each loky worker notices its parent is gone and stops, so none goes on writing.
    args = ["-m", "experiment=sweep_local", *FAST, "data.num_train=2048", "pretrain.epochs=200",
            "trainer.limit_train_batches=null", "logger=none", "prune.sparsity=0.5,0.8"]
    log = open(tmp_path / "sweep.log", "w")
    main = subprocess.Popen([sys.executable, "-m", "prunelab.cli", *args], cwd=tmp_path, env=cli_env(),
                            stdout=log, stderr=subprocess.STDOUT)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 600
        while "== pretrain" not in (tmp_path / "sweep.log").read_text():
            assert main.poll() is None and time.monotonic() < deadline, (tmp_path / "sweep.log").read_text()
            time.sleep(0.5)
        workers = _children(main.pid)
        assert workers
        main.send_signal(signal.SIGKILL)
        main.wait()
        deadline = time.monotonic() + 300  # a liveness bound, not a timing claim: they stop within seconds
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.5)
        alive = [w for w in workers if _alive(w)]
        assert not alive, (alive, (tmp_path / "sweep.log").read_text()[-3000:])
        assert "the sweep's main process" in (tmp_path / "sweep.log").read_text()
    finally:
        log.close()
        if main.poll() is None:
            main.kill()
            main.wait()
        for w in workers:  # only the processes this test started
            if _alive(w):
                os.kill(w, signal.SIGKILL)
