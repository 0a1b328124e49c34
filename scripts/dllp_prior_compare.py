"""DLLP vs one-shot L2 unit pruning on a digits MLP, before any fine-tuning (docs/methods/dllp.md, issue #14).

For each seed: train a 64-48-32-10 ReLU MLP on 1,400 sklearn digits (Adam, 600 steps), then at unit sparsity
``s`` (fraction of the 80 hidden units removed) compare the test accuracy (397 images) of

* ``dllp[<prior>]``: DLLP with the method's defaults (M = 10 particles, W frozen, unit-budget tilt
  ``budget_lr = 0.5``, Adam lr 0.1 on the particles, ``steps`` SVGD steps of 128 examples, decision=target),
  prior importance ``taylor`` (default), ``ablation`` or ``l2``;
* ``prior[<prior>]``: the prior's own decision (top units by ``pi`` at DLLP's unit count), no SVGD;
* ``l2``: per layer the same number of units as DLLP keeps, those of largest incoming L2 norm.

and the posterior shift of the default arm (mean |rho - pi|, mode flips, particle sign flips, decision vs prior).

    PYTHONPATH=$PWD python scripts/dllp_prior_compare.py --seeds 0 1 2 3 4 --sparsity 0.5 0.7
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.dllp_tasks
from tests.dllp_tasks import accuracy, decide, digits_mlp, l2_same_counts  # noqa: E402


def prior_decision(dl, k: int) -> dict[str, torch.Tensor]:
    pi = dl.model.prior()
    flat = torch.cat(list(pi.values()))
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.argsort(descending=True, stable=True)[:k]] = True
    out = dict(zip(pi, torch.split(keep, [v.numel() for v in pi.values()])))
    for n, v in out.items():
        if not v.any():
            v[pi[n].argmax()] = True
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--priors", nargs="+", default=["taylor", "ablation", "l2"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    for s in args.sparsity:
        rows: dict[str, list[float]] = {}
        shifts: dict[str, list[float]] = {}
        for seed in args.seeds:
            net, train, test = digits_mlp(seed)
            rows.setdefault("dense", []).append(accuracy(net, test))
            for prior in args.priors:
                keep, dl = decide(net, train, seed, s, steps=args.steps, importance=prior)
                k = sum(int(v.sum()) for v in keep.values())
                rows.setdefault(f"dllp[{prior}]", []).append(accuracy(dl.pruned_model(keep=keep), test))
                rows.setdefault(f"prior[{prior}]", []).append(accuracy(dl.pruned_model(keep=prior_decision(dl, k)), test))
                if prior == args.priors[0]:
                    rows.setdefault("l2", []).append(accuracy(l2_same_counts(net, {n: int(v.sum()) for n, v in keep.items()}), test))
                    sh = dl.posterior_shift(keep)
                    for key in ("mean_abs_diff", "mode_flip_fraction", "particle_flip_fraction",
                                "decision_vs_prior_fraction", "js"):
                        shifts.setdefault(key, []).append(sh[key])
        print(f"\n## unit sparsity {s} (seeds {args.seeds})\n\n| arm | acc before fine-tuning (mean ± sd) | per seed |\n|---|---|---|")
        for arm, v in rows.items():
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            print(f"| {arm} | {100 * statistics.mean(v):.1f} ± {100 * sd:.1f} | {' '.join(f'{100 * a:.1f}' for a in v)} |")
        print(f"\nposterior shift of dllp[{args.priors[0]}]: " + ", ".join(
            f"{k} {statistics.mean(v):.3f}" for k, v in shifts.items()))


if __name__ == "__main__":
    main()
