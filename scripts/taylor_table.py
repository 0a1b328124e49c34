"""Structured pruning results beside the paper (Molchanov et al., CVPR 2019, Table 3, ResNet-50 / ImageNet).

    python scripts/taylor_table.py outputs/multirun/taylor_resnet50_imagenet [more dirs ...]

One row per run: criterion, schedule, kept fraction of the units, top-1 accuracy right after pruning (before
fine-tuning) and at the end, parameters and GFLOPs after
compaction, measured CPU latency speedup (batch 1 / 64), and the paper's row with the same kept-gate ratio.
"""

from __future__ import annotations

import argparse

import pandas as pd

from prunelab.report.collect import collect

# Taylor-FO-BN rows of Table 3: kept gates -> (top-1 %, params M, GFLOPs)
PAPER_RESNET50 = {1.00: (76.18, 25.6, 4.09), 0.91: (76.43, 22.6, 3.27), 0.81: (75.48, 17.9, 2.66),
                  0.72: (74.50, 14.2, 2.25)}


def _pct(v) -> float | None:
    return 100 * float(v) if v is not None and pd.notna(v) else None


def table(runs: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for _, r in runs.iterrows():
        amount = r.get("config.method.amount")
        kind = r.get("config.method.target_kind")
        kept = round(1.0 - float(amount), 2) if kind == "units" and amount is not None and amount < 1 else None
        paper = PAPER_RESNET50.get(kept) if r.get("model") == "resnet50" else None
        rows.append({
            "model": r.get("model"), "criterion": r.get("config.method.criterion"),
            "schedule": r.get("schedule"), "target": f"{kind} -{amount}", "kept units": kept,
            "top-1 % pruned": _pct(r.get("final.prune_test_acc")), "top-1 %": _pct(r.get("final.test_acc")),
            "params M": r.get("final.params_after", float("nan")) / 1e6,
            "GFLOPs": r.get("final.flops_after", float("nan")) / 1e9,
            "FLOPs ratio": r.get("final.flops_ratio"),
            "speedup b1": r.get("final.speedup_b1"), "speedup b64": r.get("final.speedup_b64"),
            "paper top-1 %": paper[0] if paper else None, "paper params M": paper[1] if paper else None,
            "paper GFLOPs": paper[2] if paper else None,
        })
    return pd.DataFrame(rows).sort_values(["model", "schedule", "criterion", "kept units"], na_position="last")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+")
    args = p.parse_args(argv)
    runs, problems = collect(args.dirs)
    if runs.empty:
        raise SystemExit(f"no finished runs under {args.dirs}")
    print(table(runs).to_markdown(index=False, floatfmt=".3g"))
    if not problems.empty:
        print(f"\n{len(problems)} job(s) without results:\n" + problems.to_markdown(index=False))


if __name__ == "__main__":
    main()
