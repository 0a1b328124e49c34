"""Multiruns: joblib launcher with a shared dense cache, re-runs skip finished jobs, failures are recorded."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import FULL
from tests.test_cli import FAST, prunelab


def test_joblib_multirun_shares_cache_and_reruns_nothing(tmp_path):
    # full runs: a debug-limited run (trainer.limit_*) would keep its dense model in its own folder
    args = ["-m", "experiment=sweep_local", *FULL, "logger=none", "method=magnitude,random",
            "prune.sparsity=0.5,0.9"]
    out = prunelab(tmp_path, *args, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    files = sorted(tmp_path.glob("outputs/multirun/default/*/*/results.json"))  # <sweep>/<job>/
    assert len(files) == 4
    pretrained = [json.loads(f.read_text())["stages"]["pretrain"]["cached"] for f in files]
    assert pretrained.count(False) == 1  # one job pretrained (under the cache lock), three reused it
    assert len(list((tmp_path / "outputs" / "cache" / "dense").iterdir())) == 1
    mtimes = [f.stat().st_mtime_ns for f in files]
    out = prunelab(tmp_path, *args, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [f.stat().st_mtime_ns for f in files] == mtimes  # nothing new ran
    assert (out.stdout + out.stderr).count("already done") >= 4


def test_failing_job_is_recorded_and_others_finish(tmp_path):
    out = prunelab(tmp_path, "-m", *FAST, "logger=none", "prune.sparsity=0.5,1.5")
    assert out.returncode == 1, out.stderr[-3000:]  # a job failed: the sweep says so
    jobs = [p for p in (tmp_path / "outputs" / "multirun" / "default").glob("*/*") if p.is_dir()]
    done = [j for j in jobs if (j / "results.json").exists()]
    failed = [j for j in jobs if (j / "error.txt").exists()]
    assert len(done) == 1 and len(failed) == 1
    assert "prune.sparsity must be in [0, 1)" in (failed[0] / "error.txt").read_text()


def test_slurm_and_optuna_configs_compose():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from prunelab.cli import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["experiment=slurm"], return_hydra_config=True)
        assert "submitit" in cfg.hydra.launcher._target_ and cfg.hydra.launcher.gpus_per_node == 1
        cfg = compose("config", overrides=["hparams_search=finetune_optuna"], return_hydra_config=True)
        assert "optuna" in cfg.hydra.sweeper._target_.lower()
        assert cfg.hydra.sweeper.direction == "maximize"


def test_failing_job_in_joblib_sweep_is_recorded_and_others_finish(tmp_path):
    # The same under the joblib launcher: the failure is caught in the worker process and the other jobs of
    # the grid (run in parallel with it) write their results.
    args = ["-m", "experiment=sweep_local", *FAST, "logger=none", "prune.sparsity=0.5,1.5,0.8"]
    out = prunelab(tmp_path, *args, timeout=600)
    assert out.returncode == 1, out.stderr[-3000:]
    jobs = [p for p in (tmp_path / "outputs" / "multirun" / "default").glob("*/*") if p.is_dir()]
    done = sorted(json.loads((j / "results.json").read_text())["config"]["prune"]["sparsity"]
                  for j in jobs if (j / "results.json").exists())
    failed = [j for j in jobs if (j / "error.txt").exists()]
    assert done == [0.5, 0.8] and len(failed) == 1
    assert not (failed[0] / "results.json").exists()
    assert "prune.sparsity must be in [0, 1)" in (failed[0] / "error.txt").read_text()


def test_light_imports():
    # Per-run start-up cost: the CLI module imports no torch, and a synthetic-data LeNet run imports neither
    # scikit-learn (digits only) nor W&B, timm or Torch-Pruning (scripts/bench_sweep.py measures the cost).
    code = (
        "import sys; import prunelab.cli; assert 'torch' not in sys.modules, 'cli imports torch'; "
        "from prunelab.pipeline.run import run_pipeline; from prunelab.data import SyntheticDataModule; "
        "from prunelab.models import build_model; "
        "heavy = [m for m in ('sklearn', 'wandb', 'timm', 'torch_pruning') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
