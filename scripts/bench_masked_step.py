"""Masked training step vs the same dense step (forward + backward + SGD with momentum and weight decay).

The masked step adds what prunelab's PruneModule adds: one fused multiply of the pruned gradients before the
optimiser step and one fused multiply of the weights after it. Target: ratio <= 1.05.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import interleaved, machine  # noqa: E402

from prunelab.models import build_model  # noqa: E402
from prunelab.pruning.masks import MaskSet  # noqa: E402

CASES = [("lenet_300_100", (1, 28, 28), 128), ("vgg19", (3, 32, 32), 32), ("resnet18", (3, 32, 32), 32)]


def make_step(model, opt, x, y, masks: MaskSet | None):
    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        if masks is not None:
            masks.mask_grads(model)
        opt.step()
        if masks is not None:
            masks.apply(model)

    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--sparsity", type=float, default=0.9)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"# masked vs dense training step (CPU)\nmachine: {machine()}\n")
    print("| model | input | batch | dense ms | masked ms | ratio |")
    print("|---|---|---|---|---|---|")
    for name, shape, batch in CASES:
        steps = {}
        for variant in ("dense", "masked"):
            model = build_model(name, shape, 10)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, foreach=True)
            masks = None
            if variant == "masked":
                masks = MaskSet.from_model(model)
                masks = MaskSet({n: torch.rand(m.shape) > args.sparsity for n, m in masks.items()})
                masks.apply(model)
            x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
            steps[variant] = make_step(model, opt, x, y, masks)
        t = interleaved(steps, repeats=args.repeats)
        print(f"| {name} | {'x'.join(map(str, shape))} | {batch} | {t['dense'] * 1e3:.1f} | "
              f"{t['masked'] * 1e3:.1f} | {t['masked'] / t['dense']:.3f} |")


if __name__ == "__main__":
    main()
