"""Methods that prune while training, under DDP with two CPU processes (gloo): every rank must end with the
same units (BMRS: per-epoch mask checksum; DLLP: per-epoch particle checksum; both raise on a mismatch)."""

from __future__ import annotations

import json

import pytest

from tests.test_cli import FAST, prunelab

pytestmark = pytest.mark.slow


def _result(tmp_path) -> dict:
    files = sorted(tmp_path.glob("outputs/**/results.json"))
    assert len(files) == 1  # written by rank 0 only
    return json.loads(files[0].read_text())


def test_bmrs_ddp_two_processes(tmp_path):
    out = prunelab(tmp_path, *FAST, "trainer=ddp_cpu", "logger=none", "model=mlp", "model.hidden=[32,32]",
                   "method=bmrs_u", "schedule=bayesian", "schedule.epochs=2", "measure.latency=false",
                   timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    hist = _result(tmp_path)["stages"]["prune"]["method"]["history"]
    assert [h["epoch"] for h in hist] == [0, 1] and all(h["ranks_agree"] for h in hist)


def test_dllp_ddp_two_processes(tmp_path):
    out = prunelab(tmp_path, *FAST, "trainer=ddp_cpu", "logger=none", "model=lenet_300_100", "method=dllp",
                   "schedule=train_prune", "schedule.epochs=2", "method.particles=3", "prune.sparsity=0.5",
                   "method.reliability_batches=1", "measure.latency=false", timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    res = _result(tmp_path)
    hist = res["stages"]["prune"]["method"]["history"]
    assert len(hist) == 2 and all(h["ranks_agree"] for h in hist)
    assert 0.0 <= res["final"]["dllp_undecided_fraction"] <= 1.0
