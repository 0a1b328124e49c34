"""Determinism: results.json records the thread count and deterministic flags; ``trainer.deterministic=true
threads=N`` makes a run bit-identical to any other run with the same options, whatever the thread count of the
process it runs in (a joblib worker has 1, a CLI run all cores: 1 vs 2 threads differ by ~1e-8 otherwise)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prunelab.pipeline.cache import dense_identity, dense_key
from prunelab.pipeline.run import run_pipeline
from tests.conftest import FULL


@pytest.fixture
def restore_torch_flags():
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(det)


def _final_state(res: dict) -> dict[str, torch.Tensor]:
    return torch.load(Path(res["results_file"]).parent / "stages" / "finetune.pt", weights_only=False)["model"]


def test_deterministic_mode_is_bit_identical_at_any_process_thread_count(make_cfg, tmp_path, restore_torch_flags):
    runs = []
    for ambient in (1, 2):  # the thread count the process had before the run
        torch.set_num_threads(ambient)
        cfg = make_cfg(*FULL, "trainer.deterministic=true", "threads=2", f"paths.cache_dir={tmp_path}/cache{ambient}",
                       fast=False, output_dir=tmp_path / f"t{ambient}")
        runs.append(run_pipeline(cfg))
    assert all(r["stages"]["pretrain"]["cached"] is False for r in runs)  # each trained its own dense model
    a, b = (_final_state(r) for r in runs)
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    assert runs[0]["final"] == runs[1]["final"]
    stored = json.loads(Path(runs[0]["results_file"]).read_text())["determinism"]
    assert stored == {"torch_threads": 2, "threads_option": 2, "deterministic": True, "benchmark": None,
                      "deterministic_algorithms": True}


def test_results_record_the_thread_count(make_cfg, restore_torch_flags):
    torch.set_num_threads(1)
    res = run_pipeline(make_cfg("finetune.epochs=0"))
    assert res["determinism"]["torch_threads"] == 1 and res["determinism"]["threads_option"] is None
    assert res["determinism"]["deterministic"] is False


def test_threads_option_is_checked(make_cfg):
    with pytest.raises(ValueError, match="threads=0: must be >= 1"):
        run_pipeline(make_cfg("threads=0"))


def test_dense_key_includes_the_thread_count_only_in_deterministic_mode(make_cfg, restore_torch_flags):
    def keys(*overrides: str) -> set[str]:
        cfg = make_cfg(*FULL, *overrides, fast=False)
        out = set()
        for n in (1, 2):
            torch.set_num_threads(n)
            out.add(dense_key(dense_identity(cfg)))
        return out

    assert len(keys()) == 1  # rounding-level differences: one shared dense model (documented tolerance)
    assert len(keys("trainer.deterministic=true")) == 2  # bit-identical results hold per thread count
