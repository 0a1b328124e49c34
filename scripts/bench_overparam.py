"""Fine-tuning cost of linear over-parameterization (Qian et al. 2022, arXiv 2204.11444).

For each model (CIFAR shape 3x32x32, 10 classes): optionally prune it structurally first (``--prune 0.5``:
L2-norm filter pruning removing that fraction of FLOPs, channels physically removed by prunelab's
compaction, as ``method=l2_norm schedule=oneshot`` does in the pipeline), then time one SGD fine-tuning step
(forward, cross-entropy, backward, step) of the compact model and of its expanded version (every conv/linear
but the classifier -> 1x1, k x k, 1x1 with ratio r), measured alternately (compact, expanded, compact, ...)
so that drifts in the machine's load hit both alike; medians. Also: the expansion time, the merge time and
the merge's agreement with the expanded model (eval mode). Nothing is asserted.

    python scripts/bench_overparam.py --models vgg19 resnet56 --prune 0.5 --ratio 4 --batch-size 32
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import interleaved, machine  # noqa: E402

from prunelab.finetune.overparam import count_params, expand_model, merge_model  # noqa: E402

INPUT_SHAPE = (3, 32, 32)
NUM_CLASSES = 10


def build(name: str) -> nn.Module:
    from prunelab.models import build_model

    return build_model(name, input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES)


def prune_compact(model: nn.Module, amount: float, kind: str) -> nn.Module:
    """L2-norm structured pruning of ``amount`` of ``kind`` (flops|params|units) and compaction."""
    from prunelab.pruning.structured.pruner import PruneSchedule, StructuredPruner

    p = StructuredPruner(model, torch.zeros(2, *INPUT_SHAPE), "l2_norm",
                         schedule=PruneSchedule(target=amount, target_kind=kind))
    p.one_shot([], amount, kind)
    small = p.compact()
    p.remove_gates()
    return small


def _flops(model: nn.Module) -> float:
    from prunelab.metrics.flops import flops_by_module

    return float(flops_by_module(model, INPUT_SHAPE)[0])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stepper(model: nn.Module, batch: int, device: torch.device):
    """One SGD fine-tuning step (forward, cross-entropy, backward, step) as a closure."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch, *INPUT_SHAPE, device=device)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        _sync(device)

    return step


def bench(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, object]:
    torch.manual_seed(0)
    dense = build(name)
    n_dense = count_params(dense)
    compact = prune_compact(dense, args.prune, args.kind) if args.prune > 0 else dense
    compact.to(device)
    expanded = copy.deepcopy(compact)
    t0 = time.perf_counter()
    names = expand_model(expanded, ratio=args.ratio, generator=torch.Generator().manual_seed(0))
    t_expand = time.perf_counter() - t0
    n_compact, n_expanded = count_params(compact), count_params(expanded)
    f_compact, f_expanded = _flops(compact), _flops(expanded)
    times = interleaved({"compact": stepper(compact, args.batch_size, device),
                         "expanded": stepper(expanded, args.batch_size, device)},
                        repeats=args.repeats, warmup=args.warmup)
    expanded.eval()
    x = torch.randn(8, *INPUT_SHAPE, device=device)
    with torch.no_grad():
        y_exp = expanded(x)
        _sync(device)
        t0 = time.perf_counter()
        merge_model(expanded)
        _sync(device)
        t_merge = time.perf_counter() - t0
        err = ((expanded(x) - y_exp).abs().max() / y_exp.abs().max().clamp_min(1e-12)).item()
    return {
        "model": name, "layers": len(names), "params_dense": n_dense, "params_compact": n_compact,
        "params_expanded": n_expanded, "params_merged": count_params(expanded), "flops_compact": f_compact,
        "flops_expanded": f_expanded, "step_compact_s": times["compact"], "step_expanded_s": times["expanded"],
        "expand_s": t_expand, "merge_s": t_merge, "merge_rel_err": err,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["vgg19", "resnet56"])
    p.add_argument("--prune", type=float, default=0.5, help="fraction of --kind removed first (0: no pruning)")
    p.add_argument("--kind", default="flops", choices=["flops", "params", "units"])
    p.add_argument("--ratio", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"machine: {machine()}")
    print(f"device={device} ratio={args.ratio} batch={args.batch_size} input={INPUT_SHAPE} prune={args.prune} of "
          f"{args.kind} (l2_norm, compacted) warmup={args.warmup} repeats={args.repeats} (interleaved medians)")
    print("| model | layers expanded | params dense | params compact | params expanded | params merged | "
          "GFLOPs compact | GFLOPs expanded | step compact | step expanded | ratio | expand | merge | "
          "merge rel err |")
    print("|" + "---|" * 14)
    for name in args.models:
        r = bench(name, args, device)
        print(f"| {r['model']} | {r['layers']} | {r['params_dense']:,} | {r['params_compact']:,} | "
              f"{r['params_expanded']:,} | {r['params_merged']:,} | {r['flops_compact'] / 1e9:.3f} | "
              f"{r['flops_expanded'] / 1e9:.3f} | {r['step_compact_s']:.3f} s | {r['step_expanded_s']:.3f} s | "
              f"{r['step_expanded_s'] / r['step_compact_s']:.1f}x | {r['expand_s']:.2f} s | {r['merge_s']:.3f} s | "
              f"{r['merge_rel_err']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
