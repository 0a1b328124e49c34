"""Rank correlation of every structured criterion with the oracle (Molchanov et al. 2019, Tables 1-2 style).

Each model is briefly trained on synthetic data shaped like its dataset (CIFAR-10: 3x32x32, 10 classes;
MNIST: 1x28x28, 10 classes; class-dependent templates plus noise, so there is something to learn), then every
criterion and the oracle ``(E(unit removed) - E(full))^2`` are computed on the same batches, and the
Spearman and Kendall correlations over all scored units are printed as a Markdown table.

    python scripts/oracle_correlation.py --models lenet_300_100 lenet5_caffe --train-steps 100
    python scripts/oracle_correlation.py --models vgg19 resnet18 --oracle-groups 3 --vgg-width 0.25

The oracle costs one forward pass per unit and batch: ``--oracle-groups N`` restricts it (and the
correlation) to N groups spread over the network.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
import torch.nn.functional as F
from scipy.stats import kendalltau, spearmanr

from prunelab.models import build_model
from prunelab.pruning.structured import criteria as C
from prunelab.pruning.units.gates import Gates
from prunelab.pruning.units.groups import build_groups

MODELS = {
    "lenet_300_100": ((1, 28, 28), {}),
    "lenet5": ((1, 28, 28), {}),
    "lenet5_caffe": ((1, 28, 28), {}),
    "vgg19": ((3, 32, 32), {}),
    "resnet18": ((3, 32, 32), {}),
    "resnet20": ((3, 32, 32), {}),
}


def synthetic(shape, n: int, classes: int = 10, noise: float = 3.0, seed: int = 0):
    """Class templates (smooth random images) plus Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    low = torch.randn(classes, c, max(1, h // 4), max(1, w // 4), generator=g)
    templates = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    y = torch.randint(0, classes, (n,), generator=g)
    x = templates[y] + noise * torch.randn(n, c, h, w, generator=g)
    return x, y


def train(model, x, y, steps: int, batch: int, lr: float) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    model.train()
    loss = torch.tensor(float("nan"))
    for s in range(steps):
        i = (s * batch) % (x.shape[0] - batch + 1)
        loss = F.cross_entropy(model(x[i:i + batch]), y[i:i + batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


def spread(items: list, n: int | None) -> list:
    if n is None or n >= len(items):
        return items
    idx = torch.linspace(0, len(items) - 1, n).round().long().unique().tolist()
    return [items[i] for i in idx]


def correlations(args, name: str) -> dict[str, tuple[float, float]]:
    shape, kw = MODELS[name]
    if name == "vgg19":
        kw = {"width": args.vgg_width}
    torch.manual_seed(args.seed)
    model = build_model(name, shape, 10, **kw)
    x, y = synthetic(shape, args.train_samples + args.score_batches * args.batch_size, noise=args.noise,
                     seed=args.seed)
    n_train = args.train_samples
    t0 = time.perf_counter()
    loss = train(model, x[:n_train], y[:n_train], args.train_steps, args.batch_size, args.lr)
    logging.info("%s: trained %d steps in %.1fs, last loss %.3f", name, args.train_steps,
                 time.perf_counter() - t0, loss)
    groups = build_groups(model, x[:1])
    chosen = spread([g.id for g in groups], args.oracle_groups)
    gates = Gates(model, groups)
    model.train(not args.eval_mode)
    batches = [(x[n_train + i * args.batch_size: n_train + (i + 1) * args.batch_size],
                y[n_train + i * args.batch_size: n_train + (i + 1) * args.batch_size])
               for i in range(args.score_batches)]
    crits = [c for c in args.criteria if c != "oracle"]
    if "bn_scale" in crits and not all(g.has_norm() for g in groups):
        crits.remove("bn_scale")
    t0 = time.perf_counter()
    res = C.all_criteria_scores(model, gates, groups, batches, F.cross_entropy, criteria=[*crits, "oracle"],
                                hessian=args.hessian, samples=args.samples, seed=args.seed,
                                oracle_groups=chosen)
    logging.info("%s: scored %d units in %.1fs", name, sum(res["oracle"][g].numel() for g in chosen),
                 time.perf_counter() - t0)
    oracle = torch.cat([res["oracle"][g] for g in chosen])
    out = {}
    for c in crits:
        s = torch.cat([res[c][g] for g in chosen])
        out[c] = (float(spearmanr(s, oracle).statistic), float(kendalltau(s, oracle).statistic))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["lenet_300_100", "lenet5_caffe", "vgg19", "resnet18"],
                   choices=sorted(MODELS))
    p.add_argument("--criteria", nargs="+", default=["taylor_fo", "taylor_fo_weight", "taylor_so", "l2_norm",
                                                      "bn_scale", "random"])
    p.add_argument("--train-steps", type=int, default=100)
    p.add_argument("--train-samples", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--score-batches", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--oracle-groups", type=int, default=None, help="restrict the oracle to N groups")
    p.add_argument("--vgg-width", type=float, default=0.25)
    p.add_argument("--hessian", choices=["exact", "hutchinson"], default="exact")
    p.add_argument("--samples", type=int, default=8, help="Hutchinson samples")
    p.add_argument("--eval-mode", action="store_true", help="score with BN in eval mode")
    p.add_argument("--noise", type=float, default=3.0, help="noise std of the synthetic images")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = {}
    for m in args.models:  # each model's row as soon as it is done (the big models take a while)
        rows[m] = correlations(args, m)
        print(f"{m}: " + ", ".join(f"{c} {v[0]:.3f}/{v[1]:.3f}" for c, v in rows[m].items()), flush=True)
    crits = [c for c in args.criteria if any(c in r for r in rows.values())]
    print("\n| model | " + " | ".join(f"{c} (Spearman / Kendall)" for c in crits) + " |")
    print("|---|" + "---|" * len(crits))
    for m, r in rows.items():
        cells = [f"{r[c][0]:.3f} / {r[c][1]:.3f}" if c in r else "n/a" for c in crits]
        print(f"| {m} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
