"""Markdown tables (mean ± sd over seeds, n) of the Fashion-MNIST grids, for docs/results/.

    python scripts/fmnist_tables.py connectivity /work/runs/cm_fmnist/outputs/multirun/cm_fmnist
    python scripts/fmnist_tables.py taylor /work/runs/taylor_fmnist/outputs/multirun/taylor_lenet5_fashion_mnist

connectivity: the paper's two views as tables: test accuracy per (method, allocation, target) x compression,
the effective compression reached with a direct target, and the direct compression needed for an effective
target. taylor: accuracy right after one-shot pruning, per criterion x fraction of parameters removed, plus the
parameters and units left.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prunelab.report.collect import collect  # noqa: E402


def _cell(v: pd.Series, fmt: str, scale: float = 1.0) -> str:
    v = v.dropna().astype(float) * scale
    if v.empty:
        return "–"
    if len(v) == 1:
        return f"{v.iloc[0]:{fmt}} (1)"
    return f"{v.mean():{fmt}} ± {v.std():{fmt}} ({len(v)})"


def _comp(v: pd.Series) -> str:
    v = v.dropna().astype(float)
    if v.empty:
        return "–"
    if (v == math.inf).any():
        return f"inf in {int((v == math.inf).sum())}/{len(v)}"
    return f"{v.mean():.4g} ({len(v)})" if len(v) > 1 and v.std() < 0.005 * v.mean() else _cell(v, ".4g")


def pivot(runs: pd.DataFrame, rows: list[str], col: str, fn) -> str:
    out = []
    cols = sorted(runs[col].dropna().unique())
    for key, g in runs.groupby(rows, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        out.append([*map(str, key), *[fn(g[g[col] == c]) for c in cols]])
    header = [*[r.split(".")[-1].rstrip("_") for r in rows], *[f"{c:g}" for c in cols]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in out])


def connectivity(runs: pd.DataFrame) -> str:
    runs = runs.assign(method_=runs["method"].where(runs["schedule"] != "iterative", runs["method"] + " (IMP)"))
    rows = ["method_", "allocation", "config.prune.target"]
    seeds = sorted(int(s) for s in runs["config.seed"].dropna().unique())
    parts = [f"Runs: {len(runs)}; seeds present: {seeds}. Cells: mean ± sd (number of seeds).", "",
             "### Test accuracy (%) vs requested compression", "",
             pivot(runs, rows, "config.prune.compression", lambda g: _cell(g["final.test_acc"], ".1f", 100)), "",
             "### Effective compression reached with a direct target", "",
             pivot(runs[runs["config.prune.target"] == "direct"], rows[:2], "config.prune.compression",
                   lambda g: _comp(g["final.compression_effective"])), "",
             "### Direct compression needed for an effective target", "",
             pivot(runs[runs["config.prune.target"] == "effective"], rows[:2], "config.prune.compression",
                   lambda g: _comp(g["final.compression_direct"]))]
    return "\n".join(parts) + "\n"


def taylor(runs: pd.DataFrame) -> str:
    runs = runs.assign(criterion=runs["config.method.criterion"])
    seeds = sorted(int(s) for s in runs["config.seed"].dropna().unique())
    dense = runs.groupby("config.seed")["final.pretrain_test_acc"].first()
    kept = runs["final.params_after"].astype(float) / runs["final.params_before"].astype(float) \
        if "final.params_before" in runs else None
    parts = [f"Runs: {len(runs)}; seeds present: {seeds}; dense test accuracy per seed: "
             + ", ".join(f"{s}: {100 * a:.2f}%" for s, a in dense.items()) + ". Cells: mean ± sd (n).", "",
             "### Test accuracy (%) right after one-shot pruning vs fraction of parameters removed", "",
             pivot(runs, ["criterion"], "config.method.amount", lambda g: _cell(g["final.prune_test_acc"], ".1f", 100))]
    if "final.test_acc" in runs:
        parts += ["", "### Test accuracy (%) at the end (after finetune.epochs of fine-tuning; = the above at 0)", "",
                  pivot(runs, ["criterion"], "config.method.amount", lambda g: _cell(g["final.test_acc"], ".1f", 100))]
    if kept is not None:
        runs = runs.assign(kept=kept)
        parts += ["", "### Fraction of parameters left after compaction", "",
                  pivot(runs, ["criterion"], "config.method.amount", lambda g: _cell(g["kept"], ".3f"))]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("grid", choices=["connectivity", "taylor"])
    ap.add_argument("dirs", nargs="+")
    args = ap.parse_args(argv)
    runs, _ = collect(args.dirs)
    if runs.empty:
        raise SystemExit("no finished runs")
    print(connectivity(runs) if args.grid == "connectivity" else taylor(runs))


if __name__ == "__main__":
    main()
