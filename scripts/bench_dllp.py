"""Benchmark: time per DLLP training step with M particles vs one step of the plain network.

One DLLP step = one batched forward of all M particles, the SVGD direction (per-layer RBF kernels), the
W backward and both optimiser steps (:meth:`prunelab.pruning.bayes.dllp.DLLP.train_step`). The plain step is
forward + cross-entropy + backward + SGD step of the same network. Reported: median milliseconds per step and
the ratio DLLP / plain, for M = 1, 4, 10 on LeNet-300-100 (MNIST shape, batch 128) and ResNet-18 (CIFAR
shape, batch 32). Prints a table; asserts nothing.

    python scripts/bench_dllp.py [--device cuda] [--steps 10] [--particles 1 4 10] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from prunelab.pruning.bayes.dllp import DLLP, attach_gates


def build(name: str, input_shape: tuple[int, int, int], num_classes: int = 10) -> nn.Module:
    """The registry model when available, else torchvision's ResNet-18 / a local 784-300-100-10 MLP."""
    try:
        from prunelab.models import build_model

        return build_model(name, input_shape=input_shape, num_classes=num_classes)
    except Exception as e:  # noqa: BLE001 - any failure: use the fallback
        print(f"[bench] registry model {name!r} unavailable ({e}); using a fallback")
    if name == "resnet18":
        import torchvision

        return torchvision.models.resnet18(num_classes=num_classes)
    width = input_shape[0] * input_shape[1] * input_shape[2]
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(width, 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, num_classes),
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], device: torch.device, steps: int, warmup: int) -> float:
    """Median wall time (ms) of ``step`` over ``steps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def bench_model(
    name: str, shape: tuple[int, int, int], batch: int, particles: list[int], device: torch.device, steps: int
) -> list[tuple[str, int, float, float]]:
    torch.manual_seed(0)
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    net = build(name, shape).to(device).train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)

    def plain_step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()

    plain = time_steps(plain_step, device, steps, warmup=2)
    rows = []
    for m in particles:
        dm = attach_gates(net, n_particles=m).train()
        dllp = DLLP(dm, n_train=50_000)
        z_opt = dllp.particle_optimizer()
        w_opt = torch.optim.SGD(dllp.weight_parameters(), lr=1e-3)

        def dllp_step(
            d: DLLP = dllp, zo: torch.optim.Optimizer = z_opt, wo: torch.optim.Optimizer = w_opt
        ) -> None:
            d.train_step(x, y, zo, wo)

        t = time_steps(dllp_step, device, steps, warmup=2)
        dm._remove_hooks()  # leave the plain network hook-free for the next M
        rows.append((name, m, plain, t))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--particles", type=int, nargs="+", default=[1, 4, 10])
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    ap.add_argument("--models", nargs="+", default=["lenet_300_100", "resnet18"])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    configs = {"lenet_300_100": ((1, 28, 28), 128), "resnet18": ((3, 32, 32), 32)}
    rows = []
    for name in args.models:
        shape, batch = configs[name]
        rows += bench_model(name, shape, batch, args.particles, device, args.steps)
    print(f"device={device} threads={torch.get_num_threads()} steps={args.steps} (median ms per step)")
    print(f"{'model':<16}{'M':>4}{'plain ms':>12}{'DLLP ms':>12}{'ratio':>9}{'ratio/M':>9}")
    for name, m, plain, t in rows:
        print(f"{name:<16}{m:>4}{plain:>12.2f}{t:>12.2f}{t / plain:>9.2f}{t / plain / m:>9.2f}")


if __name__ == "__main__":
    main()
