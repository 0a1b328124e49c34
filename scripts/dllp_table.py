"""Markdown table DLLP vs magnitude pruning from results.json files: accuracy and reliability side by side.

    python scripts/dllp_table.py outputs/multirun/dllp_small [more dirs or results.json files] [--eval]
        [--out table.md]

One row per run (mean over seeds when several runs share method and sparsity): the arm, its target
(``prune.sparsity``, or ``method.amount`` of a structured arm removing a fraction of units), the measured parameter sparsity of the final network, test accuracy after pruning and after fine-tuning, and
DLLP's reliability report from the pruning stage (particle-ensemble accuracy / NLL / Brier / ECE / mutual
information, accuracy across particles mean +- sd, undecided fraction, mean standard error of rho,
agreement of the deployed network with the ensemble). ``--eval`` also loads every run's deployed network right
after pruning (compacted, before fine-tuning) and after fine-tuning and measures NLL (and Brier score) and ECE
(15 bins) on the test set, so the calibration of DLLP's deployed network and of the other arms' are compared on
equal terms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

DLLP_COLS = [("dllp_ensemble_acc", "ens. acc"), ("dllp_ensemble_nll", "ens. NLL"),
             ("dllp_ensemble_brier", "ens. Brier"), ("dllp_ensemble_ece", "ens. ECE"),
             ("dllp_ensemble_mutual_info", "MI"), ("dllp_undecided_fraction", "undecided"),
             ("dllp_rho_se_mean", "SE(rho)"), ("dllp_agreement", "agree")]


def find_results(paths: list[str]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        out.extend([p] if p.is_file() else sorted(p.rglob("results.json")))
    return out


def arm(res: dict[str, Any]) -> str:
    m = res["config"]["method"]
    name = m["_target_"].rsplit(".", 1)[-1]
    if name == "DLLPMethod":
        return f"dllp ({m.get('granularity', 'unit')}s, M={m.get('particles')})"
    if name == "MagnitudeScorer":
        return "magnitude (weights)"
    if name == "StructuredMethod":
        return f"{m.get('criterion')} ({m.get('target_kind')})"
    return name


def target(cfg: dict[str, Any]) -> float:
    """The arm's pruning target: ``method.amount`` for a structured method removing a fraction of units (it does
    not read ``prune.sparsity``), else ``prune.sparsity`` (DLLP: the fraction of gated units removed)."""
    m = cfg["method"]
    if m["_target_"].endswith("StructuredMethod") and m.get("target_kind") == "units":
        return float(m["amount"])
    return float(cfg["prune"]["sparsity"])


def _stage_model(run_dir: Path, cfg: dict[str, Any], stage: str, dm) -> torch.nn.Module | None:
    """The network a stage recorded: its compacted module, or the state dict loaded into the architecture."""
    from hydra.utils import instantiate

    path = run_dir / "stages" / f"{stage}.pt"
    if not path.exists():
        return None
    rec = torch.load(path, map_location="cpu", weights_only=False)
    if rec.get("module") is not None:
        model = rec["module"]
        model.load_state_dict(rec["model"])
        return model
    prune = torch.load(run_dir / "stages" / "prune.pt", map_location="cpu", weights_only=False)
    if prune.get("module") is not None:
        model = prune["module"]
    else:
        model = instantiate(cfg["model"], input_shape=tuple(dm.input_shape), num_classes=int(dm.num_classes))
    model.load_state_dict(rec["model"])
    return model


@torch.no_grad()
def evaluate_final(run_dir: Path, cfg: dict[str, Any]) -> dict[str, float]:
    """NLL / Brier / ECE / accuracy on the run's test split of the deployed network right after pruning
    (``pruned_*``: the compacted network before fine-tuning) and of the final, fine-tuned one (``final_*``)."""
    from hydra.utils import instantiate

    from prunelab.metrics.reliability import ensemble_metrics

    dm = instantiate(cfg["data"])
    dm.prepare_data()
    dm.setup("fit")
    out: dict[str, float] = {}
    for stage, prefix in (("prune", "pruned"), ("finetune", "final")):
        model = _stage_model(run_dir, cfg, stage, dm)
        if model is None:
            continue
        model.eval()
        probs, ys = [], []
        for x, y in dm.test_dataloader():
            x, y = dm.process_batch(x, y, train=False)
            probs.append(model(x).softmax(-1))
            ys.append(y)
        m = ensemble_metrics(torch.cat(probs)[None], torch.cat(ys))
        out.update({f"{prefix}_acc_eval": m["acc"], f"{prefix}_nll": m["nll"], f"{prefix}_brier": m["brier"],
                    f"{prefix}_ece": m["ece"], f"{prefix}_entropy": m["entropy"]})
    return out


def fmt(values: list[float], pct: bool = False) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    k = 100.0 if pct else 1.0
    mean = statistics.fmean(vals) * k
    s = f"{mean:.2f}" if pct else f"{mean:.4f}" if abs(mean) < 1 else f"{mean:.3f}"
    if len(vals) > 1:
        sd = statistics.stdev(vals) * k
        s += f" ± {sd:.2f}" if pct else f" ± {sd:.4f}"
    return s


def table(rows: list[dict[str, Any]], with_eval: bool) -> str:
    groups: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["arm"], r["sparsity"])].append(r)
    cols = ["arm", "target", "runs", "param sparsity", "acc pruned %", "acc final %"]
    if with_eval:
        cols += ["pruned NLL", "pruned ECE", "final NLL", "final Brier", "final ECE"]
    cols += ["particle acc %"] + [c for _, c in DLLP_COLS]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for (a, s), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        f = [r["final"] for r in rs]
        cells = [a, f"{s:g}", str(len(rs)), fmt([x.get("sparsity_direct") for x in f]),
                 fmt([x.get("prune_test_acc") for x in f], True), fmt([x.get("test_acc") for x in f], True)]
        if with_eval:
            cells += [fmt([r.get("eval", {}).get(k) for r in rs])
                      for k in ("pruned_nll", "pruned_ece", "final_nll", "final_brier", "final_ece")]
        pm = [x.get("dllp_particle_acc_mean") for x in f]
        if pm[0] is None:
            cells.append("–")
        else:
            cells.append(f"{100 * statistics.fmean(pm):.2f} ± {100 * statistics.fmean(x['dllp_particle_acc_sd'] for x in f):.2f}")
        cells += [fmt([x.get(k) for x in f], pct=k in ("dllp_ensemble_acc",)) for k, _ in DLLP_COLS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--eval", action="store_true", help="measure NLL/Brier/ECE of every final network")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    files = find_results(args.paths)
    if not files:
        print("no results.json found", file=sys.stderr)
        return 1
    rows = []
    for f in files:
        res = json.loads(f.read_text())
        row = {"arm": arm(res), "sparsity": target(res["config"]), "final": res["final"]}
        if args.eval:
            row["eval"] = evaluate_final(f.parent, res["config"])
        rows.append(row)
    md = table(rows, args.eval)
    print(md)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
