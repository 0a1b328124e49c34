"""Effective vs direct compression of pruning-at-initialisation methods (no training needed): the first view
of "Connectivity Matters" (Vysogorets & Kempe 2023, Fig. 1/3), at reduced scale.

For each method and direct compression, prune the freshly initialised network once (seed-averaged) and
report the effective compression (total / weights on an input-output path; inf = layer collapse).
Data-driven scorers use batches of the real MNIST test set when ../shared/datasets/mnist-t10k exists, else
synthetic MNIST-shaped data.

    python scripts/connectivity_at_init.py --model lenet_300_100 --compressions 10 100 1000
"""

from __future__ import annotations

import argparse
import gzip
import math
import statistics
from pathlib import Path

import numpy as np
import torch

from prunelab.models import build_model
from prunelab.pruning.allocation import ALLOCATIONS
from prunelab.pruning.effective import effective_sparsity_report
from prunelab.pruning.masks import MaskSet
from prunelab.pruning.scorers import SCORERS, load_all
from prunelab.pruning.target import prune_to_target

MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "mnist-t10k"
METHODS = [("random", "uniform"), ("random", "erk"), ("random", "igq"), ("magnitude", "global"),
           ("snip", "global"), ("grasp", "global"), ("synflow", "global"), ("lamp", "global")]


def batches(n: int, bs: int = 256) -> tuple[list, str]:
    img, lab = MNIST / "t10k-images-idx3-ubyte.gz", MNIST / "t10k-labels-idx1-ubyte.gz"
    if img.exists():
        x = np.frombuffer(gzip.open(img).read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
        y = np.frombuffer(gzip.open(lab).read(), np.uint8, offset=8)
        x = (torch.tensor(x[: n * bs]).float() / 255 - 0.1307) / 0.3081
        y = torch.tensor(y[: n * bs]).long()
        src = "MNIST t10k"
    else:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(n * bs, 1, 28, 28, generator=g), torch.randint(0, 10, (n * bs,), generator=g)
        src = "synthetic"
    return [(x[i * bs:(i + 1) * bs], y[i * bs:(i + 1) * bs]) for i in range(n)], src


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="lenet_300_100")
    ap.add_argument("--compressions", type=float, nargs="+", default=[10, 31.6, 100, 316, 1000])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--synflow-rounds", type=int, default=100)
    ap.add_argument("--target", default="direct", choices=["direct", "effective"])
    args = ap.parse_args()
    load_all()
    data, src = batches(4)
    shape = (1, 28, 28)
    print(f"model {args.model}, input {shape}, score data: {src}, seeds {args.seeds}, target {args.target}\n")
    head = " | ".join(f"{c:g}" for c in args.compressions)
    print(f"| method | allocation | {head} |\n|---|---|" + "---|" * len(args.compressions))
    for method, alloc in METHODS:
        cells = []
        for comp in args.compressions:
            vals = []
            for seed in range(args.seeds):
                torch.manual_seed(seed)
                model = build_model(args.model, shape, 10)
                kw = {"seed": seed} if method == "random" else {}
                if method == "synflow":
                    kw["rounds"] = args.synflow_rounds
                scorer = SCORERS.get(method)(**kw)
                if hasattr(scorer, "input_shape"):
                    scorer.input_shape = shape
                masks, _ = prune_to_target(model, MaskSet.from_model(model), scorer, ALLOCATIONS[alloc](),
                                           1 - 1 / comp, data, target=args.target, input_shape=shape)
                rep = effective_sparsity_report(model, masks, shape)
                vals.append(rep["compression_direct" if args.target == "effective" else "compression_effective"])
            finite = [v for v in vals if math.isfinite(v)]
            cell = f"{statistics.mean(finite):.4g}" if finite else "inf"
            if len(finite) < len(vals):
                cell += f" ({len(vals) - len(finite)}/{len(vals)} collapsed)"
            cells.append(cell)
        print(f"| {method} | {alloc} | " + " | ".join(cells) + " |")
    what = "effective" if args.target == "direct" else "direct (needed to reach the effective target)"
    print(f"\ncells: {what} compression, mean over seeds; columns: the target compression")


if __name__ == "__main__":
    main()
