"""The reproduction scripts (scripts/reproduce_*.sh) parse, and refuse a wrong choice before running anything."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "scripts").glob("reproduce_*.sh"))


def test_there_are_reproduction_scripts():
    assert len(SCRIPTS) >= 10


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script: Path):
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_bmrs_fmnist_refuses_an_unknown_arm_before_running(tmp_path: Path):
    runs = tmp_path / "runs"
    env = {**os.environ, "ARMS": "bmrs_n bmrs_x", "RUNS": str(runs), "PRUNELAB": "false"}
    out = subprocess.run(["bash", str(ROOT / "scripts" / "reproduce_bmrs_fmnist.sh")], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "ARMS: unknown arm 'bmrs_x'; allowed: bmrs_n l2 l2_params none bmrs_u8 bmrs_u4 snr expected_theta" in out.stderr
    assert not runs.exists()  # nothing was started


def test_connectivity_fmnist_refuses_an_unknown_group_before_running(tmp_path: Path):
    runs = tmp_path / "runs"
    env = {**os.environ, "RUNS": str(runs), "PRUNELAB": "false"}
    out = subprocess.run(["bash", str(ROOT / "scripts" / "reproduce_connectivity_fmnist.sh"), "random", "snipp"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "unknown group 'snipp'; allowed: random saliency imp synflow lamp" in out.stderr
    assert not runs.exists()
