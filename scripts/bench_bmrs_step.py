"""BMRS training step on LeNet-5 (Fashion-MNIST shapes, batch 32, the BMRS overlay's setting): the sampler with
its closed-form pathwise gradient (``lognormal.sample_log_theta``) against the same sampler differentiated by
autograd through its composed operations (the implementation before it), side by side in one process.

    python scripts/bench_bmrs_step.py [--batch 32] [--pairs 7] [--threads 1]

Prints the median step time of each and their ratio (median of interleaved pairs, with the IQR)."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prunelab.models.lenet import lenet5  # noqa: E402
from prunelab.pruning.bayes import bmrs as B  # noqa: E402
from prunelab.pruning.bayes import lognormal as ln  # noqa: E402


class _ImplicitNdtriLog(torch.autograd.Function):
    @staticmethod
    def forward(ctx, log_p):
        x = ln._ndtri_log_impl(log_p)
        ctx.save_for_backward(log_p, x)
        return x

    @staticmethod
    def backward(ctx, grad):
        log_p, x = ctx.saved_tensors
        return grad * torch.exp(log_p - ln.log_phi(x))


def composed_sample_log_theta(mu, sigma, log_a, log_b, u):
    """The sampler as a composition of differentiable operations (autograd builds its gradient)."""
    alpha, beta = ln.standardized_bounds(mu, sigma, log_a, log_b)
    log_z = ln.log_ndtr_diff(alpha, beta)
    u = u.clamp(torch.finfo(u.dtype).tiny, 1.0 - torch.finfo(u.dtype).eps)
    lp_lo = torch.logaddexp(torch.special.log_ndtr(alpha), torch.log(u) + log_z)
    lp_hi = torch.logaddexp(torch.special.log_ndtr(-beta), torch.log1p(-u) + log_z)
    eps = _ImplicitNdtriLog.apply(torch.minimum(lp_lo, lp_hi))
    return (mu + sigma * torch.where(lp_lo <= lp_hi, eps, -eps)).clamp(log_a, log_b)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=50, help="steps per timed block")
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = lenet5((1, 28, 28), 10)
    x = torch.randn(args.batch, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch,))
    noises = B.insert_noise(model, example=x[:2], log_a=-20.0, log_b=0.0)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def block() -> float:
        start = time.perf_counter()
        for _ in range(args.steps):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y) + B.kl_loss(noises)
            loss.backward()
            opt.step()
        return (time.perf_counter() - start) / args.steps * 1e3

    fast = ln.sample_log_theta
    times: dict[str, list[float]] = {"closed_form": [], "composed": []}
    try:
        block()
        for _ in range(args.pairs):
            for name, fn in (("closed_form", fast), ("composed", composed_sample_log_theta)):
                ln.sample_log_theta = fn
                times[name].append(block())
    finally:
        ln.sample_log_theta = fast
        torch.set_num_threads(threads)
    ratios = sorted(c / f for c, f in zip(times["composed"], times["closed_form"]))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    print(f"LeNet-5 + BMRS noise, batch {args.batch}, {args.threads} thread(s), {args.pairs} pairs of "
          f"{args.steps} steps")
    for name, t in times.items():
        print(f"  {name:12s} {statistics.median(t):7.2f} ms/step")
    print(f"  speed-up (composed / closed form): median {statistics.median(ratios):.2f}x, "
          f"IQR {q[0]:.2f}-{q[2]:.2f}")


if __name__ == "__main__":
    main()
