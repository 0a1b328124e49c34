"""The SLURM overlay combined with a paper overlay: the launcher Hydra builds from it, down to the sbatch
script submitit would submit (nothing is submitted: no cluster here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate

from prunelab.cli import CONFIG_DIR

ROOT = Path(__file__).resolve().parent.parent
OVERLAYS = "experiment=[bmrs_mlp_mnist,slurm]"  # two options of one group: Hydra's list syntax


def _compose(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture
def captured_submission(tmp_path, monkeypatch):
    """Launch through Hydra's real submitit launcher with submitit's array submission replaced by a
    recorder (and a dummy ``srun`` on PATH, which submitit looks for): returns what would be submitted."""
    import submitit

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    seen: dict = {}

    def record(self, fn, *args):
        seen.update(executor=self._executor, fn=fn, args=args)
        return []

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", record)

    def launch(*overrides: str) -> dict:
        cfg = _compose(*overrides, f"hydra.sweep.dir={tmp_path / 'sweep'}")
        launcher = instantiate(cfg.hydra.launcher)
        launcher.setup(hydra_context=None, task_function=None, config=cfg)
        launcher.launch([["seed=0"], ["seed=1"]], initial_job_idx=0)
        return dict(seen, cfg=cfg, params=launcher.params)

    return launch


def test_paper_overlay_with_slurm_launcher(captured_submission):
    sub = captured_submission(OVERLAYS)
    cfg, params = sub["cfg"], sub["params"]
    # the paper overlay's settings survive, the slurm overlay adds the launcher and the GPU trainer
    assert cfg.name == "bmrs_mlp_mnist" and list(cfg.model.hidden) == [100] * 7 and cfg.method.rule == "bmrs_n"
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.devices == 1
    assert cfg.hydra.launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert params["name"] == "bmrs_mlp_mnist"  # job name from the experiment name
    assert params["max_num_timeout"] == 3 and params["tasks_per_node"] == 1 == params["gpus_per_node"]
    assert sub["executor"].max_num_timeout == 3  # requeues on timeout
    # what SLURM would receive
    script = sub["executor"]._make_submission_file_text("COMMAND", "uid")
    for line in ("--job-name=bmrs_mlp_mnist", "--ntasks-per-node=1", "--gpus-per-node=1", "--nodes=1",
                 "--signal=USR2@120", "--time=240", "--open-mode=append"):
        assert f"#SBATCH {line}\n" in script, (line, script)
    # on the timeout signal submitit resubmits the launcher's job with the same arguments (it then resumes)
    import submitit

    assert isinstance(sub["fn"].checkpoint(*[a[0] for a in sub["args"]]), submitit.helpers.DelayedSubmission)
    assert [a[0] for a in sub["args"]][0] == ["seed=0"]


def test_tasks_per_node_follow_trainer_devices(captured_submission):
    sub = captured_submission(OVERLAYS, "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2")
    assert sub["cfg"].trainer.strategy == "ddp"  # the command line wins over the overlay's trainer
    assert (sub["params"]["tasks_per_node"], sub["params"]["gpus_per_node"], sub["params"]["nodes"]) == (4, 4, 2)
    script = sub["executor"]._make_submission_file_text("COMMAND", "uid")
    assert "#SBATCH --ntasks-per-node=4\n" in script and "#SBATCH --nodes=2\n" in script


def test_list_syntax_on_the_command_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "prunelab.cli", OVERLAYS, "--info", "defaults"],
                         cwd=tmp_path, env=env, text=True, capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "experiment/bmrs_mlp_mnist" in out.stdout and "experiment/slurm" in out.stdout
    assert "hydra/launcher/submitit_slurm" in out.stdout
