"""The ``prunelab`` command as a user runs it: help, printed config, a run, W&B offline, DDP on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prunelab.utils.wandb_offline import read_offline_run

FAST = ["data=synthetic", "data.num_train=256", "data.num_test=64", "data.batch_size=32", "pretrain.epochs=1",
        "finetune.epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false"]


def prunelab(cwd: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "prunelab.cli", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout)


def results_files(root: Path) -> list[Path]:
    return sorted(root.glob("outputs/**/results.json"))


def test_help_lists_groups(tmp_path):
    out = prunelab(tmp_path, "--help")
    assert out.returncode == 0, out.stderr
    for group in ("data", "model", "method", "allocation", "schedule", "finetune", "trainer", "logger"):
        assert f"{group}:" in out.stdout
    assert "lenet_300_100" in out.stdout and "magnitude" in out.stdout


def test_cfg_job_prints_config(tmp_path):
    out = prunelab(tmp_path, "--cfg", "job", "prune.sparsity=0.5")
    assert out.returncode == 0, out.stderr
    assert "sparsity: 0.5" in out.stdout and "_target_: prunelab.data.DigitsDataModule" in out.stdout


def test_run_then_rerun_resumes_in_same_folder(tmp_path):
    out = prunelab(tmp_path, *FAST, "logger=csv")
    assert out.returncode == 0, out.stderr
    files = results_files(tmp_path)
    assert len(files) == 1 and "runs/default/" in str(files[0])
    res = json.loads(files[0].read_text())
    assert res["final"]["sparsity_direct"] == pytest.approx(0.9, abs=1e-3)
    assert (files[0].parent / "csv" / "metrics.csv").exists()
    first = files[0].stat().st_mtime_ns
    out = prunelab(tmp_path, *FAST, "logger=csv")  # same config -> same folder, stages loaded
    assert out.returncode == 0, out.stderr
    assert results_files(tmp_path) == files and files[0].stat().st_mtime_ns >= first
    assert "already done" in out.stderr + out.stdout


def test_bad_option_message(tmp_path):
    out = prunelab(tmp_path, *FAST, "prune.sparsity=1.5")
    assert out.returncode != 0
    assert "prune.sparsity must be in [0, 1)" in out.stderr
    out = prunelab(tmp_path, "method=nope")
    assert out.returncode != 0 and "Available options" in out.stderr


def test_wandb_offline_logged_keys_read_back(tmp_path):
    long_dir = tmp_path / ("a_cache_folder_whose_path_is_longer_than_wandbs_tag_limit_" * 2)
    out = prunelab(tmp_path, *FAST, "logger=wandb", "tags=[ablation,sweep_2]", "method=random",
                   "allocation=uniform", f"paths.cache_dir={long_dir}")
    assert out.returncode == 0, out.stderr
    runs = list(tmp_path.glob("outputs/runs/**/wandb/offline-run-*"))
    assert len(runs) == 1, list(tmp_path.glob("outputs/runs/**/wandb/*"))
    logged = read_offline_run(runs[0])
    history_keys = {k for row in logged["history"] for k in row}
    assert {"pretrain/train/loss", "pretrain/train/acc", "pretrain/val/acc", "finetune/test/acc"} <= history_keys
    summary = logged["summary"]
    for key in ("pretrain/test/acc", "prune/sparsity/direct", "prune/sparsity/effective", "finetune/test/acc",
                "test_acc", "sparsity_direct", "compression_effective", "val_acc_best"):
        assert key in summary, (key, sorted(summary))
    assert summary["sparsity_direct"] == pytest.approx(0.9, abs=1e-3)
    # the run config: the resolved config, flattened, with each group's option name (not final/* metrics)
    config = logged["config"]
    assert config["method"] == "random" and config["allocation"] == "uniform" and config["model"] == "lenet_300_100"
    assert config["data"] == "synthetic" and config["schedule"] == "oneshot" and config["finetune"] == "vanilla"
    assert config["prune.sparsity"] == 0.9 and config["seed"] == 0 and config["pretrain.optimizer.lr"] == 0.1
    assert config["data.num_train"] == 256 and len(config["run_id"]) == 10
    assert not any(k.startswith(("final/", "logger.", "hydra")) or k.endswith("_target_") for k in config)
    # curated short tags plus the user's; W&B's 64-character limit never reached; readable name; group
    assert logged["tags"] == ["method=random", "allocation=uniform", "schedule=oneshot", "target=direct",
                              "sparsity=0.9", "model=lenet_300_100", "data=synthetic", "seed=0", "ablation",
                              "sweep_2"]
    assert logged["name"] == "random sparsity=0.9 seed=0"
    assert logged["group"] == "default"


def test_wandb_offline_false_wins_over_the_cli_default(tmp_path):
    """logger.wandb.offline=false asks W&B to go online even though the CLI sets WANDB_MODE=offline: with no
    API key (HOME and the W&B config moved to an empty folder; the server address unreachable) W&B then
    refuses to start without a login, which it never does offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    env.update(HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "wandb_cfg"), WANDB_API_KEY="",
               WANDB_BASE_URL="http://127.0.0.1:9", WANDB_SILENT="true", PYTHONWARNINGS="ignore")

    def run(*extra: str) -> subprocess.CompletedProcess:
        # main() itself, which sets WANDB_MODE=offline unless the environment says otherwise
        return subprocess.run([sys.executable, "-c", "from prunelab.cli import main; main()", *FAST,
                               "logger=wandb", "pretrain.epochs=0", "finetune.epochs=0", *extra],
                              cwd=tmp_path, text=True, capture_output=True, timeout=300, env=env)

    out = run("logger.wandb.offline=false")
    assert out.returncode != 0
    assert "wandb login" in out.stderr or "API key" in out.stderr, out.stderr[-2000:]
    out = run()  # offline, the default: no login needed
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.slow
def test_ddp_cpu_two_processes(tmp_path):
    out = prunelab(tmp_path, *FAST, "trainer=ddp_cpu", "logger=none", "method=random", timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    files = results_files(tmp_path)
    assert len(files) == 1  # one results.json, written by rank 0
    res = json.loads(files[0].read_text())
    sync = res["stages"]["finetune"]["mask_sync"]
    assert sync["world_size"] == 2
    assert sync["identical_before_sync"] is True and len(set(sync["digests"])) == 1
    assert res["final"]["sparsity_direct"] == pytest.approx(0.9, abs=1e-3)
