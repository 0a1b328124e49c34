"""Shared fixtures: compose the real configs (as the CLI does) with test overrides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from prunelab.cli import CONFIG_DIR, quiet_lightning
from prunelab.config import register_configs
from prunelab.runinfo import register_resolvers

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# Every results.json a test writes (in-process or through the CLI, whose environment inherits this) is
# validated against prunelab/results_schema.json; a violation fails the run (prunelab/pipeline/run.py).
os.environ.setdefault("PRUNELAB_STRICT_RESULTS", "1")
register_configs()
register_resolvers()

# One batch per stage, tiny synthetic data, no progress bar: fast end-to-end runs.
FAST = [
    "data=synthetic",
    "data.num_train=256",
    "data.num_test=64",
    "data.batch_size=32",
    "pretrain.epochs=1",
    "finetune.epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.enable_progress_bar=false",
    "logger=none",
]


# FAST without trainer.limit_*: a full run (not a debug run, so it uses the shared dense cache) on 80 samples
# (72 train: two batches of 32; 8 validation; 64 test). For tests of the shared dense cache.
FULL = [o for o in FAST if not o.startswith(("trainer.limit_", "data.num_train="))] + ["data.num_train=80"]


def compose_config(root: Path, overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root = str(root)
        cfg.paths.output_dir = str(output_dir or root / "run")
        del cfg["hydra"]
    quiet_lightning()
    return cfg


@pytest.fixture
def make_cfg(tmp_path):
    def _make(*overrides: str, fast: bool = True, output_dir: Path | None = None) -> DictConfig:
        return compose_config(tmp_path, (FAST if fast else []) + list(overrides), output_dir)

    return _make


# The fast tier (`make test-fast`: unit and property tests) leaves out the modules that run whole pipelines,
# the CLI in subprocesses or several processes; `make test` (CI) runs everything.
END_TO_END = {
    "test_bad_input", "test_bmrs_pipeline", "test_cache", "test_cli", "test_ddp", "test_ddp_methods",
    "test_determinism", "test_dllp_pipeline", "test_eval", "test_export", "test_faults", "test_model_sources",
    "test_overparam_pipeline", "test_pipeline", "test_readme", "test_results_schema", "test_slurm",
    "test_structured_pipeline", "test_sweep_summary", "test_sweeps", "test_vectorized", "test_bench_gpu",
}


# The longest tests first: with `-n 2 --dist worksteal` (make test) one worker starts on them while the other
# works through the rest and steals what is left, so the suite takes about max(longest, total / 2).
LONGEST_FIRST = ("test_readme", "test_ddp", "test_cli")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in END_TO_END:
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank)))


if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: one torch thread each
    import torch

    torch.set_num_threads(1)
