"""Comparison table for Qian et al., "Boosting Pruned Networks with Linear Over-parameterization" (arXiv
2204.11444): vanilla fine-tuning vs linear over-parameterization vs over-parameterization + SP-KD of the same
compact (structurally pruned) network.

    python scripts/overparam_table.py outputs/multirun/overparam_resnet56_cifar10 [more dirs] [--out t.md]

Reads every ``results.json`` under the given folders (prunelab/report/collect.py), groups the runs by model,
data and structured pruning ratio (``method.amount``, fraction of ``method.target_kind`` removed) and prints a
markdown table: params/FLOPs of the compact model, test accuracy (mean ± std over seeds, n) of each fine-tuning
strategy, the gain of each strategy over vanilla, and the paper's numbers beside when known (``PAPER``).

The paper's per-ratio accuracies could not be retrieved in this environment (no access to the PDF; the
stored web pages carry only the abstract), so ``PAPER`` is empty and the "paper" columns print "n/a" unless
filled in (key: (model, dataset, ratio), value: {"vanilla": acc, "overparam": acc, "overparam_spkd": acc}, in
percent). The only claim checked here is the abstract's: over-parameterized fine-tuning (+ SP-KD)
"significantly outperforms the vanilla fine-tuning strategy, especially for large pruning ratio".
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prunelab.report.collect import collect  # noqa: E402

STRATEGIES = ("vanilla", "overparam", "overparam_spkd")
FINETUNE_TARGETS = {
    "prunelab.finetune.base.Finetune": "vanilla",
    "prunelab.finetune.overparam_strategy.OverParam": "overparam",
    "prunelab.finetune.overparam_strategy.OverParamSPKD": "overparam_spkd",
}
# Paper's reported top-1 accuracies (%), keyed by (model, dataset, structured ratio). Not available here: see
# the module docstring. Fill in from Qian et al. 2022, Tables 1-3, to print them beside the measurements.
PAPER: dict[tuple[str, str, float], dict[str, float]] = {}


def _dataset(row: pd.Series) -> str:
    target = str(row.get("config.data._target_", ""))
    name = target.rsplit(".", 1)[-1].replace("DataModule", "").lower()
    return name or "?"


def _spkd_label(row: pd.Series) -> str:
    pos = row.get("config.finetune.positions")
    gamma = pd.to_numeric(row.get("config.finetune.gamma"), errors="coerce")
    return f"overparam_spkd ({pos}, γ={gamma:g})"


def load(dirs: list[str], by_spkd: bool = False) -> pd.DataFrame:
    runs, problems = collect(dirs)
    if not problems.empty:
        for _, p in problems.iterrows():
            print(f"warning: {p['status']} run {p['path']} {p['error']}", file=sys.stderr)
    if runs.empty:
        return runs
    runs = runs.copy()
    runs["strategy"] = runs["config.finetune._target_"].map(FINETUNE_TARGETS).fillna(runs["config.finetune._target_"])
    if by_spkd:  # one column per SP-KD setting (positions, gamma)
        spkd = runs["strategy"] == "overparam_spkd"
        runs.loc[spkd, "strategy"] = runs[spkd].apply(_spkd_label, axis=1)
    runs["model"] = runs["config.model.name"]
    runs["dataset"] = runs.apply(_dataset, axis=1)
    runs["ratio"] = pd.to_numeric(runs["config.method.amount"], errors="coerce")
    runs["kind"] = runs.get("config.method.target_kind", "")
    runs["criterion"] = runs.get("config.method.criterion", "")
    return runs


def _cell(values: pd.Series) -> str:
    v = pd.to_numeric(values, errors="coerce").dropna() * 100
    if v.empty:
        return "–"
    s = f"{v.mean():.2f}"
    if len(v) > 1:
        s += f" ± {v.std(ddof=1):.2f}"
    return f"{s} ({len(v)})"


def _mean_pct(values: pd.Series) -> str:
    v = pd.to_numeric(values, errors="coerce").dropna() * 100
    return "–" if v.empty else f"{v.mean():.2f}"


def _fmt_count(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.0f}"


def table(runs: pd.DataFrame, setting: str | None = None) -> str:
    present = set(runs["strategy"])
    strategies = [s for s in STRATEGIES if s in present or s == "vanilla"]
    strategies += sorted(present - set(STRATEGIES))
    header = ["setting", "ratio", "params after (before)", "FLOPs after (before)", "dense acc", "pruned acc"]
    header += list(strategies) + [f"Δ {s}" for s in strategies if s != "vanilla"]
    header += [f"paper {s}" for s in STRATEGIES]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (model, dataset, kind, ratio), g in runs.groupby(["model", "dataset", "kind", "ratio"], sort=True):
        name = setting or f"{model} / {dataset}"
        p_after = pd.to_numeric(g.get("final.params_after"), errors="coerce").mean()
        p_before = pd.to_numeric(g.get("final.params_before"), errors="coerce").mean()
        f_after = pd.to_numeric(g.get("final.flops_after"), errors="coerce").mean()
        f_before = pd.to_numeric(g.get("final.flops_before"), errors="coerce").mean()
        accs = {s: g.loc[g["strategy"] == s, "final.test_acc"] for s in strategies}
        means = {s: pd.to_numeric(a, errors="coerce").mean() * 100 for s, a in accs.items()}
        paper = PAPER.get((model, dataset, float(ratio)), {})
        row = [name, f"{ratio:g} of {kind}", f"{_fmt_count(p_after)} ({_fmt_count(p_before)})",
               f"{_fmt_count(f_after)} ({_fmt_count(f_before)})", _mean_pct(g["final.pretrain_test_acc"]),
               _mean_pct(g["final.prune_test_acc"])]
        row += [_cell(accs[s]) for s in strategies]
        for s in [s for s in strategies if s != "vanilla"]:
            d = means[s] - means["vanilla"]
            row.append("–" if math.isnan(d) else f"{d:+.2f}")
        row += [f"{paper[s]:.2f}" if s in paper else "n/a" for s in STRATEGIES]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", help="multirun/run folders holding results.json files")
    ap.add_argument("--setting", default=None, help="label of the setting column (default: model / dataset)")
    ap.add_argument("--by-spkd", action="store_true",
                    help="one column per SP-KD setting (finetune.positions, finetune.gamma)")
    ap.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    runs = load(args.dirs, args.by_spkd)
    if runs.empty:
        print("no finished runs found", file=sys.stderr)
        return 1
    text = ("Test accuracy (%) after fine-tuning, mean ± std over seeds (n); Δ = mean gain over vanilla "
            "(percentage points); dense / pruned acc: before pruning / after pruning, before fine-tuning (means)."
            "\n\n" + table(runs, args.setting))
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
