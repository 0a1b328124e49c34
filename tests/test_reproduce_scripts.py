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
    assert "ARMS: unknown arm 'bmrs_x'; allowed: bmrs_n l2 l2_params l2_noisy bmrs_n_zeroed l2_noisy_epochs none bmrs_u8 bmrs_u4 snr expected_theta" in out.stderr
    assert not runs.exists()  # nothing was started


def test_bmrs_fmnist_l2_arms_read_the_fraction_of_their_own_bmrs_n_arm(tmp_path: Path):
    """Each L2 arm runs at the unit fraction of the BMRS_N run of its seed made under the same protocol: the
    authors' per-epoch L2 (zeroing) at the zeroing BMRS_N's, every other L2 arm at the plain BMRS_N's; an arm
    whose BMRS_N run is missing is skipped and makes the script fail. The runs are stand-ins: PRUNELAB is a
    script that records its arguments."""
    import json
    import sys

    runs = tmp_path / "runs"
    sweep = runs / "outputs" / "multirun" / "bmrs_mlp_fashion_mnist"
    for folder, zeroed, frac, after in (("plain", False, 0.8, 10), ("zeroed", True, 0.6, 30)):
        (sweep / folder).mkdir(parents=True)
        (sweep / folder / "results.json").write_text(json.dumps({
            "config": {"seed": 0, "method": {"zero_pruned": zeroed}},
            "final": {"rule": "bmrs_n", "delta_f_n_variant": "code", "frac_units_removed": frac,
                      "params_after": after, "params_before": 100}}))
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "fake_prunelab"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    fake.chmod(0o755)
    env = {**os.environ, "RUNS": str(runs), "PRUNELAB": str(fake), "PYTHON": sys.executable,
           "SETTINGS": "mlp_fashion_mnist", "SEEDS": "0 1",
           "ARMS": "bmrs_n_zeroed l2_noisy l2_noisy_epochs l2_params"}
    out = subprocess.run(["bash", str(ROOT / "scripts" / "reproduce_bmrs_fmnist.sh")], env=env,
                         capture_output=True, text=True, timeout=120)
    lines = calls.read_text().splitlines()
    seed0 = [line for line in lines if "seed=0" in line]
    assert any("method=bmrs_n method.zero_pruned=true" in line for line in seed0)
    (noisy,) = [line for line in seed0 if "method=bmrs_l2" in line and "l2_epoch_threshold" not in line]
    assert "method.amount=0.8000" in noisy and "zero_pruned" not in noisy
    (epochs,) = [line for line in seed0 if "method.l2_epoch_threshold=0.5" in line]
    assert "method.amount=0.6000" in epochs and "method.zero_pruned=true" in epochs
    (params,) = [line for line in seed0 if "method=l2_norm" in line]
    assert "method.target_kind=params" in params and "method.amount=0.9000" in params
    # seed 1 has no BMRS_N run of either kind: its L2 arms are skipped, each named, and the script fails
    assert not [line for line in lines if "seed=1" in line and ("method=bmrs_l2" in line or "method=l2_norm" in line)]
    assert "seed 1: no bmrs_n_zeroed result (run the bmrs_n_zeroed arm first), l2_noisy_epochs arm skipped" in out.stderr
    assert "seed 1: no bmrs_n result (run the bmrs_n arm first), l2_noisy arm skipped" in out.stderr
    assert out.returncode == 1


def test_connectivity_fmnist_refuses_an_unknown_group_before_running(tmp_path: Path):
    runs = tmp_path / "runs"
    env = {**os.environ, "RUNS": str(runs), "PRUNELAB": "false"}
    out = subprocess.run(["bash", str(ROOT / "scripts" / "reproduce_connectivity_fmnist.sh"), "random", "snipp"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "unknown group 'snipp'; allowed: random saliency imp synflow lamp" in out.stderr
    assert not runs.exists()


def test_bmrs_table_counts_each_seed_once(tmp_path: Path, capsys):
    """A run repeated under a new run folder (its config gained an option, say) is not averaged in twice: the
    newest results.json of a (setting, arm, seed) is kept, the older ones are named on stderr."""
    import json

    from tests.helpers import load_script

    def run(folder: str, seed: int, acc: float, mtime: float, l2: bool = False, rule: str = "bmrs_n") -> None:
        job = tmp_path / folder
        job.mkdir()
        method = {"criterion": "l2_norm", "target_kind": "units"} if l2 else {"p": 8}
        final = ({"units_removed_frac": 0.5, "params_after": 50, "params_before": 100} if l2
                 else {"rule": rule, "delta_f_n_variant": "code", "frac_units_removed": 0.4,
                       "frac_params_removed": 0.45})
        doc = {"config": {"name": "bmrs_mlp" + ("_l2" if l2 else ""), "seed": seed, "method": method},
               "final": {**final, "test_acc": acc}, "run_id": folder}
        (job / "results.json").write_text(json.dumps(doc))
        os.utime(job / "results.json", (mtime, mtime))

    run("a", 0, 0.50, 1000)
    run("b", 0, 0.80, 2000)  # the same arm and seed, newer
    run("c", 1, 0.70, 1500)
    run("d", 0, 0.30, 3000, l2=True)
    run("e", 0, 0.40, 1000, l2=True)
    run("f", 0, 0.60, 1000, rule="l2_norm")  # method=bmrs_l2: the authors' L2 arm, its own arm
    run("g", 0, 0.90, 4000)  # BMRS_N seed 0 again, with the authors' in-place zeroing: another arm, not a re-run
    doc = json.loads((tmp_path / "g" / "results.json").read_text())
    doc["config"]["method"]["zero_pruned"] = True
    (tmp_path / "g" / "results.json").write_text(json.dumps(doc))
    os.utime(tmp_path / "g" / "results.json", (4000, 4000))
    runs, _ = load_script("bmrs_table").labelled([str(tmp_path)])
    assert sorted(runs["run_id"]) == ["b", "c", "d", "f", "g"]
    assert "2 run(s) left out" in capsys.readouterr().err
    text = load_script("bmrs_table").table([str(tmp_path)])
    assert "| bmrs_mlp | bmrs_n (code) | 2 | 75.0 ± 7.1 |" in text
    assert "| bmrs_mlp | l2_noisy | 1 | 60.0 | n/a | 40.0 | 45.0 |" in text
    assert "| bmrs_mlp | bmrs_n_zeroed | 1 | 90.0 |" in text
    assert "2 run(s) left out, superseded" in text and str(tmp_path / "a") in text
