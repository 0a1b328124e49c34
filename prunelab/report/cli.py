"""``prunelab-report DIR... [--by COL ...] [--metrics COL ...] [--out DIR]``

Collects every ``results.json`` under the given run / multirun folders, groups the runs by the option names
they were started with (``method=bmrs_u``, ``allocation=igq``, ...) and the other settings that vary (or by
``--by``; seeds and path-valued settings are never grouped), aggregates seeds (mean ± std, count) and writes
``report.md``, ``report.tex`` (paper number formats, constant columns moved to the caption), ``report.csv``
(aggregates), ``runs.csv`` (every run) and PNG plots into ``--out``. Jobs without results are listed as
missing or failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prunelab.report.collect import aggregate, collect, default_groups
from prunelab.report.format import display_table, to_latex
from prunelab.report.plots import accuracy_vs_compression, effective_vs_direct, layer_profiles

DEFAULT_METRICS = ["final.test_acc", "final.sparsity_direct", "final.compression_direct",
                   "final.sparsity_effective", "final.compression_effective", "final.flops_remaining"]


def _resolve(runs, names: list[str]) -> list[str]:
    out = []
    for n in names:
        for cand in (n, f"config.{n}", f"final.{n}"):
            if cand in runs.columns:
                out.append(cand)
                break
        else:
            raise SystemExit(f"--by/--metrics: no column {n!r}; columns: {', '.join(sorted(runs.columns))}")
    return out


def build_report(dirs: list[str], out: Path, by: list[str] | None = None, metrics: list[str] | None = None,
                 plots: bool = True) -> dict:
    """Tables and plots of the runs under ``dirs``. ``by``: group columns (default: the option names and
    settings that vary, seeds and paths excluded: :func:`~prunelab.report.collect.default_groups`)."""
    runs, problems = collect(dirs)
    out.mkdir(parents=True, exist_ok=True)
    if runs.empty:
        return {"runs": 0, "problems": problems, "notes": []}
    by = default_groups(runs) if by is None else _resolve(runs, by)
    metrics = _resolve(runs, metrics) if metrics else [m for m in DEFAULT_METRICS if m in runs]
    notes = []
    if runs["schema_version"].isna().any():
        notes.append(f"{int(runs['schema_version'].isna().sum())} run(s) were written before results.json had a "
                     "schema (no recorded option names: grouped by their config only)")
    table = aggregate(runs, by, metrics)
    disp = display_table(table, by, metrics)
    (out / "report.md").write_text(disp.to_markdown(index=False) + "\n")
    n = table[[f"{m}_count" for m in metrics if f"{m}_count" in table]].max(axis=1) if metrics else None
    (out / "report.tex").write_text(to_latex(display_table(table, by, metrics, counts=False), n,
                                             caption="Mean $\\pm$ std over seeds."))
    table.to_csv(out / "report.csv", index=False)
    runs.to_csv(out / "runs.csv", index=False)
    if not problems.empty:
        problems.to_csv(out / "problems.csv", index=False)
    files = []
    if plots:
        plot_by = [c for c in by if c not in ("config.prune.compression", "config.prune.sparsity")]
        for fn in (lambda: accuracy_vs_compression(runs, plot_by, out, "direct"),
                   lambda: accuracy_vs_compression(runs, plot_by, out, "effective"),
                   lambda: effective_vs_direct(runs, plot_by, out),
                   lambda: layer_profiles(runs, by, out)):
            p = fn()
            if p is not None:
                files.append(p)
    return {"runs": len(runs), "groups": len(table), "by": by, "metrics": metrics, "problems": problems,
            "table": table, "display": disp, "plots": files, "notes": notes}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="prunelab-report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", help="run or multirun folders (searched recursively)")
    ap.add_argument("--by", nargs="*", default=None,
                    help="group columns: option names (method allocation schedule finetune model data trainer) "
                         "or settings (prune.compression method.p); default: those that vary, seeds excluded")
    ap.add_argument("--metrics", nargs="*", default=None, help="metric columns (e.g. test_acc compression_effective)")
    ap.add_argument("--out", default="outputs/report", help="output folder")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    rep = build_report(args.dirs, Path(args.out), args.by, args.metrics, plots=not args.no_plots)
    if rep["runs"] == 0:
        print("no results.json found under: " + " ".join(args.dirs), file=sys.stderr)
    else:
        print(rep["display"].to_markdown(index=False))
        print(f"\n{rep['runs']} runs in {rep['groups']} groups; tables and plots in {args.out}")
        for note in rep["notes"]:
            print(f"note: {note}")
    if not rep["problems"].empty:
        print(f"\n{len(rep['problems'])} job(s) without results:")
        for _, r in rep["problems"].iterrows():
            print(f"  {r['status']:8s} {r['path']}  {r['error']}")
    sys.exit(0 if rep["runs"] else 1)


if __name__ == "__main__":
    main()
