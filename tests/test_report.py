"""prunelab-report on synthetic sets of results.json files (each valid against the results schema): expected
aggregates, grouping by the recorded option names, seeds and paths never grouped, missing / failed jobs,
plots (distinct colours, x error bars, collapsed runs marked), LaTeX formats without constant columns."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import matplotlib.colors as mcolors
import pandas as pd
import pytest

from prunelab.report.cli import build_report, main
from prunelab.report.collect import collect, default_groups
from prunelab.report.format import si3, sig3
from prunelab.report.plots import (
    accuracy_vs_compression_figure,
    effective_vs_direct_figure,
    layer_profiles_figure,
)
from prunelab.results import schema_errors

TARGETS = {"magnitude": "prunelab.pruning.scorers.magnitude.MagnitudeScorer",
           "snip": "prunelab.pruning.scorers.snip.SNIPScorer",
           "bmrs_n": "prunelab.pruning.bayes.bmrs_method.BMRSMethod",
           "bmrs_u": "prunelab.pruning.bayes.bmrs_method.BMRSMethod"}


def results_doc(job: Path, method: str, compression: float, seed: int, acc: float, *, eff: float | None = None,
                collapse: bool = False, method_cfg: dict | None = None, extra_cfg: dict | None = None) -> dict:
    """A complete results.json (schema-valid) of a oneshot run."""
    eff = compression if eff is None else eff
    cfg = {"seed": seed, "method": {"_target_": TARGETS.get(method, "prunelab.pruning.structured.method."
                                                                      "StructuredMethod"), "seed": seed,
                                    **(method_cfg or {})},
           "allocation": {"_target_": "prunelab.pruning.allocation.GlobalAllocation"},
           "schedule": {"_target_": "prunelab.pipeline.schedules.OneShot"},
           "finetune": {"_target_": "prunelab.finetune.base.Finetune", "epochs": 1},
           "data": {"_target_": "prunelab.data.SyntheticDataModule", "seed": seed, "data_dir": str(job / "data")},
           "model": {"_target_": "prunelab.models.build_model", "name": "lenet_300_100"},
           "trainer": {"_target_": "lightning.pytorch.Trainer"}, "pretrain": {"epochs": 1},
           "prune": {"compression": compression, "sparsity": None}, "paths": {"output_dir": str(job)},
           **(extra_cfg or {})}
    final = {"test_acc": acc, "test_loss": 1.0, "val_acc_best": acc, "val_acc_last": acc, "pretrain_test_acc": 0.95,
             "prune_test_acc": acc, "sparsity_direct": 1 - 1 / compression, "compression_direct": compression,
             "sparsity_effective": 1.0 if collapse else 1 - 1 / eff, "compression_effective": None if collapse else eff,
             "layer_collapse": collapse, "params_total": 1000, "params_remaining": int(1000 / compression),
             "flops_dense": 2000, "flops_remaining": 100, "sparsity_target": 1 - 1 / compression,
             "target": "direct", "nonfinite": {"compression_effective": "inf"} if collapse else {}}
    return {"schema_version": 1, "run_id": f"{abs(hash((str(job), seed))) % 16**10:010x}",
            "choices": {"method": method, "allocation": "global", "schedule": "oneshot", "finetune": "vanilla",
                        "model": "lenet_300_100", "data": "synthetic", "trainer": "cpu"},
            "environment": {"prunelab_version": "0.1.0", "git_commit": None, "git_dirty": None, "python": "3.11",
                            "torch": "2.4", "lightning": "2.4", "cuda": None, "platform": "Linux",
                            "num_threads": 2, "deterministic_algorithms": False, "trainer_deterministic": False},
            "config": cfg, "final": final,
            "stages": {"prune": {"metrics": {"prune/test/acc": acc}}, "finetune": {"metrics": {}, "epochs": 1}},
            "layers": [{"name": "a.weight", "shape": [4, 4], "numel": 16, "remaining": 8, "effective_remaining": 4}],
            "wall_time_s": 1.0}


def write_run(root: Path, method: str, compression: float, seed: int, acc: float, **kw) -> Path:
    job = root / f"{method}_{compression}_{seed}_{len(list(root.glob('*'))) if root.exists() else 0}"
    job.mkdir(parents=True)
    doc = results_doc(job, method, compression, seed, acc, **kw)
    assert schema_errors(doc) == []  # the synthetic runs are what the pipeline writes
    (job / "results.json").write_text(json.dumps(doc))
    return job


@pytest.fixture
def sweep(tmp_path):
    accs = {}
    for method in ("magnitude", "snip"):
        for comp in (10.0, 100.0):
            for seed in range(3):
                acc = 0.9 - 0.01 * seed - (0.1 if comp == 100 else 0) - (0.05 if method == "snip" else 0)
                accs.setdefault((method, comp), []).append(acc)
                write_run(tmp_path / "sweep", method, comp, seed, acc, eff=comp * (3 if method == "snip" else 1))
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
    # seeds (config.seed, method.seed, data.seed) and paths (output_dir, data_dir) are never group keys
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
    assert list(t.columns) == ["method", "final.test_acc_mean", "final.test_acc_std", "final.test_acc_count",
                               "collapsed"]
    assert t["final.test_acc_count"].tolist() == [6, 6]


def test_unknown_column_is_a_clear_error(sweep, tmp_path):
    root, _ = sweep
    with pytest.raises(SystemExit, match="no column 'nope'"):
        main([str(root), "--by", "nope", "--out", str(tmp_path / "o3")])


CRITERIA = ("taylor_fo", "taylor_fo_weight", "taylor_so", "l2_norm", "bn_scale", "random_structured", "oracle")


def test_groups_by_recorded_option_names(tmp_path):
    """bmrs_n and bmrs_u share a class (BMRSMethod) and the seven structured criteria share one
    (StructuredMethod): the module path cannot tell them apart, the recorded option names do."""
    root = tmp_path / "runs"
    for seed in range(2):
        write_run(root, "bmrs_n", 10.0, seed, 0.8, method_cfg={"rule": "bmrs_n"})
        write_run(root, "bmrs_u", 10.0, seed, 0.7, method_cfg={"rule": "bmrs_u"})
        for i, crit in enumerate(CRITERIA):
            write_run(root, crit, 10.0, seed, 0.5 + 0.01 * i, method_cfg={"criterion": crit, "amount": 0.5})
    rep = build_report([str(root)], tmp_path / "out", by=["method"], plots=False)
    t = rep["table"].set_index("method")
    assert sorted(t.index) == sorted(["bmrs_n", "bmrs_u", *CRITERIA])
    assert t.loc["bmrs_n", "final.test_acc_mean"] == pytest.approx(0.8)
    assert t.loc["bmrs_u", "final.test_acc_mean"] == pytest.approx(0.7)
    assert (t["final.test_acc_count"] == 2).all()
    # default grouping: the method's own settings (rule, criterion) are implied by its option name
    assert build_report([str(root)], tmp_path / "o2", plots=False)["by"] == ["method"]


def test_default_grouping_keeps_settings_that_vary_within_an_option(tmp_path):
    root = tmp_path / "runs"
    for seed in range(2):
        for p in (4, 8):
            write_run(root, "bmrs_u", 10.0, seed, 0.7 + 0.01 * p, method_cfg={"rule": "bmrs_u", "p": p},
                      extra_cfg={"paths": {"output_dir": str(root / f"x{seed}{p}")}})
    runs, _ = collect([root])
    assert default_groups(runs) == ["config.method.p"]


def test_default_grouping_ignores_path_valued_settings(tmp_path):
    root = tmp_path / "runs"
    for seed in range(2):
        # same weights file in two places: a path is never a sweep axis
        write_run(root, "magnitude", 10.0, seed, 0.9, extra_cfg={
            "model": {"_target_": "prunelab.models.build_model", "name": "lenet_300_100",
                      "weights": f"/home/u{seed}/dense.pt"}})
    runs, _ = collect([root])
    assert "config.model.weights" in runs and runs["config.model.weights"].nunique() == 2
    assert default_groups(runs) == []


def test_collapsed_runs_read_back_as_infinite_and_counted(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "synflow", 1000.0, 0, 0.1, collapse=True)
    write_run(root, "synflow", 1000.0, 1, 0.6, eff=1500.0)
    runs, _ = collect([root])
    assert sorted(runs["final.compression_effective"].tolist()) == [1500.0, math.inf]
    rep = build_report([str(root)], tmp_path / "out", plots=False)
    row = rep["table"].iloc[0]
    assert row["collapsed"] == 1 and row["final.compression_effective_mean"] == math.inf
    assert "collapsed" in rep["display"].columns


def test_results_written_before_the_schema_still_read(tmp_path):
    job = tmp_path / "old"
    job.mkdir()
    (job / "results.json").write_text(json.dumps({"config": {"seed": 0}, "final": {
        "test_acc": 0.1, "compression_effective": "inf", "layer_collapse": True}}))
    runs, _ = collect([tmp_path])
    assert runs["final.compression_effective"].iloc[0] == math.inf
    rep = build_report([str(tmp_path)], tmp_path / "out", plots=False)
    assert rep["notes"] and "before results.json had a schema" in rep["notes"][0]


def _line_colors(fig) -> list[str]:
    ax = fig.axes[0]
    cols = [c for c in ax.containers]  # errorbar containers: one per group
    return [mcolors.to_hex(c.lines[0].get_color()) for c in cols]


def test_plots_never_reuse_a_colour_and_label_legends_with_keys(tmp_path):
    root = tmp_path / "runs"
    names = [f"m{i}" for i in range(13)]  # more groups than matplotlib's default 10-colour cycle
    for i, name in enumerate(names):
        write_run(root, name, 10.0, 0, 0.5 + 0.01 * i)
    runs, _ = collect([root])
    for fig in (accuracy_vs_compression_figure(runs, ["method"], "effective"),
                accuracy_vs_compression_figure(runs, ["method"], "direct"),
                effective_vs_direct_figure(runs, ["method"])):
        colours = _line_colors(fig)
        assert len(colours) == 13 and len(set(colours)) == 13
        labels = fig.axes[0].get_legend_handles_labels()[1]
        assert {f"method={n}" for n in names} <= set(labels)
    fig = layer_profiles_figure(runs, ["method"])
    solid = [mcolors.to_hex(ln.get_color()) for ln in fig.axes[0].get_lines() if ln.get_linestyle() == "-"]
    assert len(solid) == 13 and len(set(solid)) == 13


def test_plots_show_x_error_bars_and_mark_collapsed_runs(tmp_path):
    root = tmp_path / "runs"
    for seed, eff in enumerate((20.0, 30.0, 40.0)):  # effective compression varies across seeds
        write_run(root, "snip", 10.0, seed, 0.8, eff=eff)
    write_run(root, "synflow", 10.0, 0, 0.1, collapse=True)
    write_run(root, "synflow", 10.0, 1, 0.7, eff=12.0)
    runs, _ = collect([root])
    fig = accuracy_vs_compression_figure(runs, ["method"], "effective")
    ax = fig.axes[0]
    snip = next(c for c in ax.containers if c.get_label() == "method=snip")
    xerr = snip.lines[2][0].get_segments()[0]  # the horizontal error bar of the single snip point
    assert xerr[0][0] == pytest.approx(20.0) and xerr[1][0] == pytest.approx(40.0)
    marks = [c for c in ax.collections if c.get_offsets().shape[0] and c.get_paths()
             and type(c).__name__ == "PathCollection"]
    offsets = [tuple(o) for c in marks for o in c.get_offsets()]
    assert any(y == pytest.approx(0.1) for _, y in offsets)  # the collapsed run is drawn, at its accuracy
    assert "collapsed (effective compression inf)" in ax.get_legend_handles_labels()[1]
    fig = effective_vs_direct_figure(runs, ["method"])
    assert any(c.get_offsets().shape[0] for c in fig.axes[0].collections if type(c).__name__ == "PathCollection")


def test_latex_formats_and_no_constant_columns(sweep, tmp_path):
    root, accs = sweep
    build_report([str(root)], tmp_path / "out", plots=False)
    tex = (tmp_path / "out" / "report.tex").read_text()
    header = next(line for line in tex.splitlines() if "test" in line and r"\\" in line and "caption" not in line)
    cols = [c.strip() for c in header.removesuffix(r"\\").split("&")]
    # constant over the table: sparsity_effective differs, but flops_remaining (100) and n (3) do not
    assert not any("flops" in c for c in cols) and "$n$" not in cols
    assert r"flops\_remaining = 100" in tex and "$n$ = 3" in tex
    rows = [line for line in tex.splitlines() if line.startswith(("magnitude", "snip"))]
    assert len(rows) == 4
    mag10 = next(r for r in rows if r.startswith("magnitude & 10"))
    mean = 100 * statistics.mean(accs[("magnitude", 10.0)])
    sd = 100 * statistics.stdev(accs[("magnitude", 10.0)])
    assert f"{mean:.2f} $\\pm$ {sd:.2f}" in mag10  # accuracy: percent, 2 decimals
    body = tex.split(r"\midrule")[1]
    assert " 30.0 " in body and " 300 " in body  # compression: 3 significant digits
    for line in tex.splitlines()[tex.splitlines().index(r"\midrule") + 1:]:
        if line.startswith("\\"):
            break
        cells = [c.strip() for c in line.removesuffix(r"\\").split("&")]
        assert len(cells) == len(cols)


def test_number_formats():
    assert [sig3(x) for x in (10.0, 123.4, 1234.0, 0.012345, 3.0)] == ["10.0", "123", "1230", "0.0123", "3.00"]
    assert [si3(x) for x in (53240, 4586000, 999, 1.2e10)] == ["53.2k", "4.59M", "999", "12.0G"]


def test_an_option_missing_from_older_runs_reads_as_its_default():
    """config.IDENTITY_DEFAULTS: a run recorded before method.zero_pruned existed computed zero_pruned=false, so a
    sweep mixing it with newer runs at false has no zero_pruned axis; a run at true does make one."""
    from prunelab.report.collect import varied_columns

    runs = pd.DataFrame({"config.method.rule": ["bmrs_n"] * 3, "config.seed": [0, 1, 2],
                         "config.method.zero_pruned": [float("nan"), False, False],
                         "config.method.l2_epoch_threshold": [float("nan"), None, None]})
    assert varied_columns(runs) == []
    runs.loc[2, "config.method.zero_pruned"] = True
    assert varied_columns(runs) == ["config.method.zero_pruned"]
