"""Structured pruning that is actually faster: FLOPs reduction vs measured CPU latency speed-up.

For each model, 50% of the units of every dependency group are removed (uniform per group, lowest L2 norm of
the incoming weights), the model is compacted (:func:`prunelab.pruning.units.compact.compact`), and the
FLOPs ratio (dense / pruned) is printed next to the measured latency speed-up at batch 1 and 64, together
with the same pruning done by Torch-Pruning's own ``MetaPruner`` + ``MagnitudeImportance`` (L2). The target
is a batch-64 speed-up of at least 0.8 x the FLOPs ratio.

    python scripts/bench_structured.py --models vgg19 resnet18 --repeats 10
    python scripts/bench_structured.py --models resnet50 --repeats 3 --warmup 1   # 224x224: slow on CPU
"""

from __future__ import annotations

import argparse
import copy
import logging

import torch
import torch_pruning as tp

from prunelab.metrics.latency import count_flops, count_params, measure_latency
from prunelab.models import build_model
from prunelab.pruning.structured import criteria as C
from prunelab.pruning.structured.pruner import per_group_masks
from prunelab.pruning.units.compact import compact
from prunelab.pruning.units.gates import Gates
from prunelab.pruning.units.groups import build_groups, find_classifier

MODELS = {"vgg19": (3, 32, 32), "resnet18": (3, 32, 32), "resnet50": (3, 224, 224), "resnet20": (3, 32, 32)}


def prunelab_compact(model: torch.nn.Module, shape, amount: float, check: bool) -> torch.nn.Module:
    x = torch.randn(2, *shape)
    groups = build_groups(model, x[:1])
    masks = per_group_masks(C.l2_norm(model, groups), amount)
    small = compact(model, masks, x[:1], groups).eval()
    if check:
        gates = Gates(model, groups)
        gates.set_masks(masks)
        model.eval()
        with torch.no_grad():
            err = (model(x) - small(x)).abs().max().item()
        gates.remove()
        logging.info("max |masked - compacted| = %.2e", err)
    return small


def torch_pruning_compact(model: torch.nn.Module, shape, amount: float) -> torch.nn.Module:
    model = copy.deepcopy(model).eval()
    pruner = tp.pruner.MetaPruner(
        model, torch.randn(1, *shape), importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=amount, ignored_layers=[find_classifier(model)], global_pruning=False,
    )
    pruner.step()
    return model


def fuse_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Fold eval-mode BatchNorm into the preceding conv (torch.fx), as an inference deployment would."""
    from torch.fx.experimental.optimization import fuse

    return fuse(copy.deepcopy(model).eval())


def bench(variants: dict[str, torch.nn.Module], shape, args) -> dict[str, dict[str, float]]:
    """Latency of every variant, measured round-robin ``rounds`` times (the best median of each is kept), so
    that load from other processes on a shared machine hits all variants alike."""
    out = {m: {"flops": count_flops(v, shape), "params": count_params(v), "b1": float("inf"), "bN": float("inf")}
           for m, v in variants.items()}
    for _ in range(args.rounds):
        for method, model in variants.items():
            lat = measure_latency(model, shape, batch_sizes=(1, args.batch), warmup=args.warmup,
                                  repeats=args.repeats, threads=args.threads)
            out[method]["b1"] = min(out[method]["b1"], lat["latency_ms_b1"])
            out[method]["bN"] = min(out[method]["bN"], lat[f"latency_ms_b{args.batch}"])
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vgg19", "resnet18", "resnet50"], choices=sorted(MODELS))
    p.add_argument("--amount", type=float, default=0.5, help="fraction of units removed in every group")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3, help="round-robin measurement rounds (best median kept)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--fuse-bn", action="store_true", help="fold BN into convs (all variants) before timing")
    p.add_argument("--no-check", action="store_true", help="skip the masked == compacted check")
    p.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning's MetaPruner comparison")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    b = args.batch
    print(f"\n| model | method | GFLOPs | params (M) | FLOPs ratio | b1 ms | b{b} ms | speed-up b1 | speed-up b{b} "
          f"| b{b} speed-up / FLOPs ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    worst = float("inf")
    for name in args.models:
        shape = MODELS[name]
        dense = build_model(name, shape, 10).eval()
        variants = {"dense": dense, "prunelab": prunelab_compact(dense, shape, args.amount, not args.no_check)}
        if not args.no_tp:
            variants["torch-pruning"] = torch_pruning_compact(dense, shape, args.amount)
        if args.fuse_bn:
            variants = {m: fuse_bn(v) for m, v in variants.items()}
        results = bench(variants, shape, args)
        base = results["dense"]
        for method, r in results.items():
            fr, s1, sn = base["flops"] / r["flops"], base["b1"] / r["b1"], base["bN"] / r["bN"]
            if method == "prunelab":
                worst = min(worst, sn / fr)
            print(f"| {name} {shape[1]}px | {method} | {r['flops'] / 1e9:.3f} | {r['params'] / 1e6:.2f} | {fr:.2f}x "
                  f"| {r['b1']:.2f} | {r['bN']:.1f} | {s1:.2f}x | {sn:.2f}x | {sn / fr:.2f} |", flush=True)
    status = "met" if worst >= 0.8 else "NOT met"
    print(f"\ntarget (batch-{b} speed-up >= 0.8 x FLOPs ratio, prunelab): {status} (worst {worst:.2f}); "
          f"threads={torch.get_num_threads() if args.threads is None else args.threads}, fuse_bn={args.fuse_bn}")


if __name__ == "__main__":
    main()
