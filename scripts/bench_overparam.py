"""Fine-tuning cost of linear over-parameterization (Qian et al. 2022, arXiv 2204.11444).

For each model: step time (forward + backward + SGD step, CIFAR-shaped batch) of the compact model and of
its expanded version (every conv/linear but the classifier -> 1x1, k x k, 1x1 with ratio r), the time to
merge back, and the merge's agreement with the expanded model. Medians over repeats after warm-up; nothing
is asserted.

    python scripts/bench_overparam.py --models resnet18 vgg11 --ratio 4 --batch-size 64 --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torchvision
from torch import nn

from prunelab.finetune.overparam import count_params, expand_model, merge_model

INPUT_SHAPE = (3, 32, 32)
NUM_CLASSES = 10


def _fallback_vgg(num_classes: int) -> nn.Module:
    cfg = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]
    layers: list[nn.Module] = []
    c = INPUT_SHAPE[0]
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            c = v
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))


def build(name: str) -> tuple[nn.Module, str]:
    """The registry model if available, else a torchvision/local stand-in; returns (model, source)."""
    try:
        from prunelab.models import build_model

        return build_model(name, input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES), "prunelab.models"
    except Exception as e:  # registry not there yet / model not registered
        fallback: dict[str, Callable[[], nn.Module]] = {
            "resnet18": lambda: torchvision.models.resnet18(num_classes=NUM_CLASSES),
            "vgg11": lambda: _fallback_vgg(NUM_CLASSES),
        }
        if name not in fallback:
            raise ValueError(f"no fallback for model {name!r} ({e})") from e
        return fallback[name](), f"fallback ({type(e).__name__})"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_time(model: nn.Module, batch: int, device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of one SGD fine-tuning step (forward, cross-entropy, backward, step)."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch, *INPUT_SHAPE, device=device)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    times = []
    for i in range(warmup + repeats):
        _sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, object]:
    torch.manual_seed(0)
    compact, source = build(name)
    compact.to(device)
    expanded = copy.deepcopy(compact)
    t0 = time.perf_counter()
    names = expand_model(expanded, ratio=args.ratio, generator=torch.Generator().manual_seed(0))
    t_expand = time.perf_counter() - t0
    t_compact = step_time(compact, args.batch_size, device, args.warmup, args.repeats)
    t_expanded = step_time(expanded, args.batch_size, device, args.warmup, args.repeats)
    expanded.eval()
    x = torch.randn(8, *INPUT_SHAPE, device=device)
    with torch.no_grad():
        y_exp = expanded(x)
        n_expanded = count_params(expanded)
        _sync(device)
        t0 = time.perf_counter()
        merge_model(expanded)
        _sync(device)
        t_merge = time.perf_counter() - t0
        err = ((expanded(x) - y_exp).abs().max() / y_exp.abs().max().clamp_min(1e-12)).item()
    return {
        "model": name, "source": source, "layers": len(names), "params_compact": count_params(compact),
        "params_expanded": n_expanded, "step_compact_s": t_compact, "step_expanded_s": t_expanded,
        "expand_s": t_expand, "merge_s": t_merge, "merge_rel_err": err,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet18", "vgg11"])
    p.add_argument("--ratio", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} ratio={args.ratio} "
          f"batch={args.batch_size} input={INPUT_SHAPE} warmup={args.warmup} repeats={args.repeats} (medians)")
    header = (f"{'model':<10}{'layers':>7}{'params compact':>16}{'params expanded':>17}{'step compact':>14}"
              f"{'step expanded':>15}{'slowdown':>10}{'expand':>9}{'merge':>9}{'merge rel err':>15}  source")
    print(header)
    for name in args.models:
        r = bench(name, args, device)
        print(f"{r['model']:<10}{r['layers']:>7}{r['params_compact']:>16,}{r['params_expanded']:>17,}"
              f"{r['step_compact_s']:>13.3f}s{r['step_expanded_s']:>14.3f}s"
              f"{r['step_expanded_s'] / r['step_compact_s']:>9.1f}x{r['expand_s']:>8.2f}s{r['merge_s']:>8.3f}s"
              f"{r['merge_rel_err']:>15.2e}  {r['source']}", flush=True)


if __name__ == "__main__":
    main()
