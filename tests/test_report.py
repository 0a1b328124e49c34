"""prunelab-report on a synthetic set of results.json files: expected aggregates, missing / failed jobs."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pandas as pd
import pytest

from prunelab.report.cli import build_report, main


def write_run(root: Path, method: str, compression: float, seed: int, acc: float) -> None:
    job = root / f"{method}_{compression}_{seed}"
    job.mkdir(parents=True)
    res = {
        "config": {"seed": seed, "method": {"_target_": f"prunelab.pruning.scorers.{method}.X"},
                   "allocation": {"_target_": "prunelab.pruning.allocation.GlobalAllocation"},
                   "prune": {"compression": compression, "sparsity": None}, "paths": {"output_dir": str(job)}},
        "final": {"test_acc": acc, "compression_direct": compression, "sparsity_direct": 1 - 1 / compression,
                  "compression_effective": compression * (3 if method == "snip" else 1),
                  "sparsity_effective": 1 - 1 / (compression * (3 if method == "snip" else 1)),
                  "flops_remaining": 100},
        "layers": [{"name": "a.weight", "shape": [4, 4], "numel": 16, "remaining": 8, "effective_remaining": 4}],
    }
    (job / "results.json").write_text(json.dumps(res))


@pytest.fixture
def sweep(tmp_path):
    accs = {}
    for method in ("magnitude", "snip"):
        for comp in (10.0, 100.0):
            for seed in range(3):
                acc = 0.9 - 0.01 * seed - (0.1 if comp == 100 else 0) - (0.05 if method == "snip" else 0)
                accs.setdefault((method, comp), []).append(acc)
                write_run(tmp_path / "sweep", method, comp, seed, acc)
    failed = tmp_path / "sweep" / "broken"
    failed.mkdir()
    (failed / "run.json").write_text("{}")
    (failed / "error.txt").write_text("Traceback ...\nRuntimeError: boom")
    missing = tmp_path / "sweep" / "pending"
    missing.mkdir()
    (missing / "run.json").write_text("{}")
    return tmp_path / "sweep", accs


def test_aggregates(sweep, tmp_path):
    root, accs = sweep
    rep = build_report([str(root)], tmp_path / "out")
    assert rep["runs"] == 12
    assert rep["by"] == ["method", "config.prune.compression"]
    t = rep["table"]
    assert len(t) == 4
    for (method, comp), values in accs.items():
        row = t[(t["method"] == method) & (t["config.prune.compression"] == comp)].iloc[0]
        assert row["final.test_acc_mean"] == pytest.approx(statistics.mean(values))
        assert row["final.test_acc_std"] == pytest.approx(statistics.stdev(values))
        assert row["final.test_acc_count"] == 3
        assert row["final.compression_effective_mean"] == pytest.approx(comp * (3 if method == "snip" else 1))
    probs = rep["problems"].set_index("status")
    assert set(probs.index) == {"failed", "missing"}
    assert "boom" in probs.loc["failed", "error"]
    for f in ("report.md", "report.tex", "report.csv", "runs.csv", "problems.csv",
              "accuracy_vs_effective_compression.png", "effective_vs_direct_compression.png",
              "layer_sparsity_profiles.png"):
        assert (tmp_path / "out" / f).exists(), f
    md = (tmp_path / "out" / "report.md").read_text()
    assert "± " in md and "(3)" in md
    assert len(pd.read_csv(tmp_path / "out" / "runs.csv")) == 12


def test_cli_grouping_and_columns(sweep, tmp_path, capsys):
    root, _ = sweep
    with pytest.raises(SystemExit) as e:
        main([str(root), "--by", "method", "--metrics", "test_acc", "--out", str(tmp_path / "o2"), "--no-plots"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "magnitude" in out and "snip" in out and "2 groups" in out
    assert "failed" in out and "missing" in out
    t = pd.read_csv(tmp_path / "o2" / "report.csv")
    assert list(t.columns) == ["method", "final.test_acc_mean", "final.test_acc_std", "final.test_acc_count"]
    assert t["final.test_acc_count"].tolist() == [6, 6]


def test_unknown_column_is_a_clear_error(sweep, tmp_path):
    root, _ = sweep
    with pytest.raises(SystemExit, match="no column 'nope'"):
        main([str(root), "--by", "nope", "--out", str(tmp_path / "o3")])
