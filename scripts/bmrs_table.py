"""Markdown table of BMRS runs (results.json files under the given folders) with the paper's numbers beside.

    python scripts/bmrs_table.py outputs/multirun/bmrs_mlp_mnist [more folders...] [--out table.md] [--csv runs.csv]

One row per (setting, rule, Delta F_N variant): test accuracy after fine-tuning, accuracy right after pruning
(before fine-tuning), fraction of units removed, fraction of parameters removed (a unit's in- and out-weights
plus its noise parameters, over the noisy model's parameters), mean ± sd over seeds (n = number of runs). Runs
without a BMRS rule appear as rule "none" (the dense baseline of scripts/reproduce_bmrs_*.sh, run name
``<setting>_none``) or "l2" (one-shot L2-norm unit pruning, ``method=l2_norm``, run name ``<setting>_l2``; "l2_params" when it
targets a fraction of the parameters, ``<setting>_l2p``); they are listed under their setting. "l2_noisy" is
``method=bmrs_l2``, the authors' L2 baseline (trained with the noise, then cut by L2 norm at BMRS_N's unit
fraction); "l2_noisy_epochs" is the same with their per-epoch cut at norm 0.5 (``--compress_epochs 1``). Which
of the two the paper's L2 column ran is not in the authors' release. A run with ``method.zero_pruned=true`` (the
authors' in-place zeroing) is its own arm, suffixed "_zeroed" (the script's l2_noisy_epochs arm appears as
"l2_noisy_epochs_zeroed").

PAPER holds the numbers the paper reports (Wright, Igel, Selvan, NeurIPS 2024, Table 1: parameter compression %
and test accuracy, mean of 10 runs). They could not be retrieved when this script was written (no network
access to the paper's PDF); the entries are None and print as "n/a" -- fill them in from Table 1.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prunelab.report.collect import collect  # noqa: E402

# (setting, rule) -> (paper test accuracy %, paper parameter compression %); None = not retrieved.
# settings are the experiment names of conf/experiment/bmrs_*.yaml; rules: none, l2_noisy (the paper's L2 column
# is the authors' L2 baseline, trained with the noise; l2_noisy_epochs is its per-epoch variant), snr, bmrs_n,
# bmrs_u (p=8), bmrs_u4 (p=4), as the columns of the paper's Table 1.
SETTINGS = ["bmrs_mlp_mnist", "bmrs_mlp_fashion_mnist", "bmrs_mlp_cifar10", "bmrs_lenet5_mnist",
            "bmrs_lenet5_fashion_mnist", "bmrs_lenet5_cifar10", "bmrs_resnet50_cifar10"]
PAPER_RULES = ["none", "l2_noisy", "snr", "bmrs_n", "bmrs_u", "bmrs_u4"]
PAPER: dict[tuple[str, str], tuple[float | None, float | None]] = {
    (s, r): (None, None) for s in SETTINGS for r in PAPER_RULES
}


def _fmt(v, sd=None, pct: bool = True) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    k = 100 if pct else 1
    text = f"{k * v:.1f}"
    return text + (f" ± {k * sd:.1f}" if sd is not None and not math.isnan(sd) else "")


def labelled(dirs: list[str]):
    """(runs with ``setting``, ``rule_``, ``variant``, ``p`` columns, jobs without results)."""
    runs, problems = collect(dirs)
    if runs.empty:
        return runs, problems
    get = lambda col, default=None: runs[col] if col in runs else default  # noqa: E731
    runs = runs.assign(
        setting=get("config.name", "?").astype(str).str.replace(r"_(none|l2|l2p)$", "", regex=True),
        rule_=get("final.rule", None),
        variant=get("final.delta_f_n_variant", None),
        p=get("config.method.p", None),
    )
    l2 = (runs["config.method.criterion"] == "l2_norm") if "config.method.criterion" in runs else runs["rule_"].isna() & False
    runs["rule_"] = runs["rule_"].where(runs["rule_"].notna(), "none").where(~l2, "l2").replace(
        {"l2_norm": "l2_noisy"})  # method=bmrs_l2, the authors' L2 arm (trained with the noise)
    if "config.method.l2_epoch_threshold" in runs:  # ... cutting at a norm after every epoch too
        runs.loc[runs["config.method.l2_epoch_threshold"].notna() & (runs["rule_"] == "l2_noisy"),
                 "rule_"] = "l2_noisy_epochs"
    if "config.method.zero_pruned" in runs:  # the authors' in-place zeroing: another arm, not another seed
        zeroed = runs["config.method.zero_pruned"].fillna(False).astype(bool)
        runs.loc[zeroed, "rule_"] = runs.loc[zeroed, "rule_"] + "_zeroed"
    if "config.method.target_kind" in runs:  # L2 at BMRS_N's fraction of the parameters rather than of the units
        runs.loc[l2 & (runs["config.method.target_kind"] == "params"), "rule_"] = "l2_params"
    # fractions removed: a BMRS rule records them (over the noisy model); a one-shot L2 arm's come from its compaction
    nan = pd.Series(float("nan"), index=runs.index)
    compacted = 1 - get("final.params_after", nan).astype(float) / get("final.params_before", nan).astype(float)
    runs["units_removed"] = get("final.frac_units_removed", nan).astype(float).where(
        ~l2, get("final.units_removed_frac", nan).astype(float))
    runs["params_removed"] = get("final.frac_params_removed", nan).astype(float).where(~l2, compacted)
    runs["params_removed_authors"] = get("final.frac_params_removed_authors", nan).astype(float)
    return newest_per_seed(runs), problems


def backfill_authors_count(runs, input_shape: tuple[int, ...], num_classes: int):
    """Fill ``params_removed_authors`` (the authors' "Comp %" count, :func:`bmrs.authors_params_removed`) for
    BMRS-rule runs recorded before prunelab wrote it: rebuild the run's noisy model from its config and keep,
    in each noise, the recorded number of units. That count depends on the per-layer numbers only (rows,
    columns and their overlap), not on which units. The rebuilt model must give the recorded
    ``frac_params_removed`` too, which checks ``input_shape`` and ``num_classes``."""
    import json

    import torch
    from hydra.utils import instantiate

    from prunelab.pruning.bayes import bmrs as B

    example = torch.zeros(2, *input_shape)
    for i, r in runs[runs["params_removed_authors"].isna() & runs["final.frac_params_removed"].notna()].iterrows():
        res = json.loads((Path(r["path"]) / "results.json").read_text())
        model = instantiate(res["config"]["model"], input_shape=tuple(input_shape), num_classes=num_classes)
        noises = B.insert_noise(model, res["config"]["method"].get("placement", "auto"), example=example)
        for name, layer in res["stages"]["prune"]["method"]["layers"].items():
            noises[name].mask.copy_(torch.arange(noises[name].units) < layer["kept"])
        ours = sum(int((~m).sum()) for m in B.param_masks(model, noises, example=example).values())
        counted = B.authors_params_removed(model, noises)
        if counted is None:  # not a plain chain: the authors' count is not defined there
            continue
        removed, total = counted
        if abs(ours / total - float(r["final.frac_params_removed"])) > 1e-9:
            raise ValueError(f"{r['path']}: the rebuilt model does not give the recorded frac_params_removed "
                             f"({ours / total:.6f} vs {r['final.frac_params_removed']:.6f}); check --input-shape "
                             "and --num-classes")
        runs.loc[i, "params_removed_authors"] = removed / total
    return runs


def newest_per_seed(runs):
    """One run per (setting, arm, seed): a config that changed (a new option, another code version) gets a new
    run folder, and an arm re-run there must not count its seed twice in a mean. The newest results.json wins;
    the others are named on stderr."""
    mtime = runs["path"].map(lambda p: (Path(p) / "results.json").stat().st_mtime)
    runs = runs.assign(_mtime=mtime).sort_values("_mtime", kind="stable")
    old = runs.duplicated(["setting", "rule_", "variant", "p", "config.seed"], keep="last")
    kept = runs[~old].drop(columns="_mtime")
    kept.attrs["superseded"] = list(runs.loc[old, "path"].astype(str))
    if old.any():
        print(f"bmrs_table: {int(old.sum())} run(s) left out, each superseded by a newer run of the same setting, "
              "arm and seed: " + ", ".join(kept.attrs["superseded"]), file=sys.stderr)
    return kept


def arm_name(rule: str, p) -> str:
    base, zeroed = (rule[: -len("_zeroed")], "_zeroed") if rule.endswith("_zeroed") else (rule, "")
    return (base if base != "bmrs_u" or p != p or float(p) == 8 else f"bmrs_u{int(float(p))}") + zeroed


def per_run_csv(runs) -> str:
    """One line per run: arm, seed, accuracies, fractions removed, run id (sorted by setting, arm, seed)."""
    lines = ["setting,arm,seed,test_acc,acc_after_pruning_before_ft,val_acc_best,frac_units_removed,"
             "frac_params_removed,frac_params_removed_authors,run_id"]
    col = lambda r, c: "" if c not in r or r[c] != r[c] else r[c]  # noqa: E731
    recs = []
    for _, r in runs.iterrows():
        rule = r["rule_"]
        recs.append((r["setting"], arm_name(rule, r["p"]), int(r["config.seed"]), col(r, "final.test_acc"),
                     col(r, "final.prune_test_acc") if rule != "none" else "", col(r, "final.val_acc_best"),
                     col(r, "units_removed"), col(r, "params_removed"), col(r, "params_removed_authors"),
                     r["run_id"]))
    for rec in sorted(recs, key=lambda t: (t[0], t[1], t[2])):
        lines.append(",".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in rec))
    return "\n".join(lines) + "\n"


def table(dirs: list[str], runs=None, problems=None) -> str:
    if runs is None:
        runs, problems = labelled(dirs)
    if runs.empty:
        return "no finished runs found in " + ", ".join(dirs)
    rows = []
    for (setting, rule, variant, p), g in runs.groupby(["setting", "rule_", "variant", "p"], dropna=False, sort=True):
        key = arm_name(rule, p)
        label = key if rule != "bmrs_n" else f"bmrs_n ({variant})"
        paper_acc, paper_comp = PAPER.get((setting, key), (None, None))

        def ms(col, g=g):
            if col not in g or not g[col].notna().any():
                return None, None
            v = g[col].astype(float)
            return float(v.mean()), (float(v.std(ddof=1)) if v.notna().sum() > 1 else None)

        units, params, authors = ms("units_removed"), ms("params_removed"), ms("params_removed_authors")
        rows.append(f"| {setting} | {label} | {len(g)} | {_fmt(*ms('final.test_acc'))} | "
                    f"{_fmt(*ms('final.prune_test_acc')) if rule != 'none' else 'n/a'} | "
                    f"{_fmt(*units)} | {_fmt(*params)} | {_fmt(*authors)} | {_fmt(paper_acc, pct=False)} | "
                    f"{_fmt(paper_comp, pct=False)} |")
    head = ("| setting | rule | n | test acc % | acc % after pruning (before FT) | units removed % | "
            "params removed % | params removed %, authors' count | paper acc % | paper params removed % |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    out = head + "\n" + "\n".join(rows)
    if len(problems):
        out += f"\n\n{len(problems)} job(s) without results: " + ", ".join(problems["path"].astype(str))
    if runs.attrs.get("superseded"):
        out += (f"\n\n{len(runs.attrs['superseded'])} run(s) left out, superseded by a newer run of the same "
                "setting, arm and seed: " + ", ".join(runs.attrs["superseded"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--out", default=None)
    ap.add_argument("--csv", default=None, help="also write one line per run to this file")
    ap.add_argument("--input-shape", type=int, nargs=3, default=None, metavar=("C", "H", "W"),
                    help="the runs' input shape: fills the authors' parameter count of runs recorded without it")
    ap.add_argument("--num-classes", type=int, default=10)
    args = ap.parse_args()
    runs, problems = labelled(args.dirs)
    if args.input_shape and not runs.empty:
        runs = backfill_authors_count(runs, tuple(args.input_shape), args.num_classes)
    text = table(args.dirs, runs, problems)
    if args.csv:
        Path(args.csv).write_text(per_run_csv(runs))
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
