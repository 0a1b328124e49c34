"""Effective sparsity is logged at the end of every training epoch of a masked stage (issue: W&B / CSV show
how connectivity evolves, and a collapsed network logs an infinite compression instead of nothing)."""

from __future__ import annotations

import csv
import math

from prunelab.pipeline.run import run_pipeline


def _rows(run_dir, key):
    with open(next(run_dir.rglob("metrics.csv"))) as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key) not in (None, "")]


def test_effective_sparsity_logged_every_finetune_epoch(make_cfg, tmp_path):
    cfg = make_cfg("logger=csv", "finetune.epochs=3", "prune.sparsity=0.9")
    res = run_pipeline(cfg)
    values = _rows(tmp_path / "run", "finetune/sparsity/effective")
    assert len(values) == 3 + 1  # one per epoch (not only once per stage), then the stage's own record
    assert all(v >= 0.9 - 1e-6 for v in values)
    assert math.isclose(values[-2], res["final"]["sparsity_effective"], rel_tol=1e-6)


def test_collapsed_network_logs_infinite_compression(make_cfg, tmp_path):
    # random pruning with uniform quotas at 99.9%: some layer keeps nothing connected
    cfg = make_cfg("logger=csv", "finetune.epochs=1", "method=random", "allocation=uniform",
                   "prune.sparsity=0.9995")
    run_pipeline(cfg)
    values = _rows(tmp_path / "run", "finetune/compression/effective")
    assert values and math.isinf(values[-1])
    assert _rows(tmp_path / "run", "finetune/layer_collapse")[-1] == 1.0
