"""Cost of computing effective sparsity, as a ratio to one training step of the same model.

For ResNet-50 at 3x224x224 and VGG-19 at 3x32x32 (random masks at 90% sparsity), reports the median over
``--repeats`` runs of:

- ``train step``: forward + backward + SGD step at batch 1 (train mode, cross-entropy);
- ``effective (full)``: :func:`prunelab.pruning.effective.effective_masks` (builds the linearised copy, one
  forward and one backward pass);
- ``effective (reuse)``: one call of a prebuilt :class:`EffectiveSparsity` (what the bisection of
  ``prune.target=effective`` pays per probe);

and their ratios to the training step (target: <= 3x). Usage::

    python scripts/bench_effective.py [--repeats 5] [--dtype float32|float64] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from prunelab.models import build_model
from prunelab.pruning.effective import EffectiveSparsity, effective_masks
from prunelab.pruning.masks import MaskSet

CASES = [("resnet50", (3, 224, 224)), ("vgg19", (3, 32, 32))]


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(name: str, shape: tuple[int, int, int], repeats: int, dtype: torch.dtype) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_model(name, shape, 10)
    g = torch.Generator().manual_seed(0)
    masks = MaskSet(
        {n: torch.rand(m.shape, generator=g) >= 0.9 for n, m in MaskSet.from_model(model).items()}
    )
    masks.apply(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x, y = torch.randn(1, *shape), torch.tensor([1])

    def train_step() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    evaluator = EffectiveSparsity(model, shape, dtype)
    t_train = median_time(train_step, repeats)
    t_full = median_time(lambda: effective_masks(model, masks, shape, dtype), repeats)
    t_reuse = median_time(lambda: evaluator(masks), repeats)
    eff = evaluator(masks)
    sparsity_eff = 1.0 - sum(int(v.sum()) for v in eff.values()) / masks.numel()
    return {
        "train": t_train,
        "full": t_full,
        "reuse": t_reuse,
        "direct": masks.sparsity(),
        "effective": sparsity_eff,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave the default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    header = (
        f"{'model':<10} {'input':<12} {'train step':>11} {'eff (full)':>11} {'ratio':>6} "
        f"{'eff (reuse)':>12} {'ratio':>6} {'direct':>7} {'effective':>10}"
    )
    print(f"threads={torch.get_num_threads()} dtype={args.dtype} repeats={args.repeats} (median seconds)")
    print(header)
    for name, shape in CASES:
        r = bench(name, shape, args.repeats, dtype)
        print(
            f"{name:<10} {'x'.join(map(str, shape)):<12} {r['train']:>11.4f} {r['full']:>11.4f} "
            f"{r['full'] / r['train']:>6.2f} {r['reuse']:>12.4f} {r['reuse'] / r['train']:>6.2f} "
            f"{r['direct']:>7.4f} {r['effective']:>10.4f}"
        )


if __name__ == "__main__":
    main()
