"""Cost metrics of a model: FLOPs, parameters and measured latency, and whether a speed-up is plausible.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode``, which counts a multiply-accumulate as 2
FLOPs (``2 * MACs``) for convolutions, ``mm`` / ``addmm`` / ``bmm`` and attention, and ignores elementwise
ops, BatchNorm, pooling and bias additions. Numbers are for ONE input sample unless ``batch_size`` is set.

Latency is measured with ``torch.utils.benchmark.Timer.blocked_autorange`` (blocks of forward passes sized
so that the timer's overhead is negligible, repeated for at least ``min_run_time`` seconds and ``repeats``
blocks) and reported as the median and the interquartile range (IQR) of the per-pass time, with the thread
count it ran under: one number without its spread cannot tell a speed-up from noise.

**Plausibility band** (:func:`check_speedup`). A speed-up ``s = latency_before / latency_after`` is
compared with the FLOPs ratio ``r = flops_before / flops_after``, allowing for the measurement's relative
spread ``e = IQR_before / median_before + IQR_after / median_after`` (first-order spread of a ratio), at
least ``MIN_SPREAD`` (5%: what two timings of the same model differ by on a quiet CPU):

- unchanged model (same FLOPs and parameters): flagged unless ``|s - 1| <= e``;
- otherwise flagged when ``s / (1 + e) > 1.5 * max(r, 1)`` (faster than the compute cut allows: a timing
  artefact such as an unwarmed first call) or ``s * (1 + e) < min(r, 1) / 1.5`` (a pruned network much
  slower than the dense one).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

logger = logging.getLogger(__name__)


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared parameters counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@contextlib.contextmanager
def _eval_no_grad(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def flop_counts(model: nn.Module, input_shape: Sequence[int], batch_size: int = 1) -> tuple[int, dict[str, int]]:
    """Total FLOPs and per-module FLOPs (keys: module names as in ``named_modules()``, ``""`` = model)."""
    x = torch.zeros(batch_size, *input_shape, device=_device(model))
    with _eval_no_grad(model), FlopCounterMode(display=False) as counter:
        model(x)
    prefix = type(model).__name__
    per_module: dict[str, int] = {}
    for key, ops in counter.get_flop_counts().items():
        if key == "Global":
            continue
        name = key[len(prefix) + 1:] if key.startswith(prefix + ".") else ("" if key == prefix else key)
        per_module[name] = int(sum(ops.values()))
    return int(counter.get_total_flops()), per_module


def count_flops(model: nn.Module, input_shape: Sequence[int], batch_size: int = 1) -> int:
    """FLOPs (= 2 x MACs, FlopCounterMode's convention) of one forward pass in eval mode."""
    return flop_counts(model, input_shape, batch_size)[0]


def benchmark_latency(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1, 64),
    warmup: int = 3,
    repeats: int = 10,
    threads: int | None = None,
    min_run_time: float = 0.2,
) -> dict[str, float]:
    """Latency of one forward pass (eval mode, ``no_grad``) per batch size, in milliseconds:
    ``latency_ms_b<B>`` (median), ``latency_iqr_ms_b<B>`` (interquartile range) and ``latency_blocks_b<B>``
    (timed blocks), plus ``latency_threads`` (the torch thread count used).

    ``warmup`` untimed passes first; then ``blocked_autorange(min_run_time)`` and, if it timed fewer than
    ``repeats`` blocks, more blocks of the same size. ``threads`` (None: ``torch.get_num_threads()``)."""
    from torch.utils.benchmark import Timer
    from torch.utils.benchmark.utils.common import Measurement

    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    if min_run_time <= 0:
        raise ValueError(f"min_run_time must be > 0, got {min_run_time}")
    device = _device(model)
    n_threads = int(threads) if threads is not None else torch.get_num_threads()
    out: dict[str, float] = {"latency_threads": n_threads}
    with _eval_no_grad(model):
        for b in batch_sizes:
            x = torch.randn(int(b), *input_shape, device=device)
            sync = "torch.cuda.synchronize()" if x.is_cuda else "pass"
            timer = Timer(stmt=f"model(x); {sync}", globals={"model": model, "x": x, "torch": torch},
                          num_threads=n_threads)
            for _ in range(max(0, int(warmup))):
                timer.timeit(1)
            m = timer.blocked_autorange(min_run_time=float(min_run_time))
            raw = list(m.raw_times)
            while len(raw) < repeats:
                raw += timer.timeit(m.number_per_run).raw_times
            m = Measurement(m.number_per_run, raw, m.task_spec)
            out[f"latency_ms_b{int(b)}"] = float(m.median) * 1e3
            out[f"latency_iqr_ms_b{int(b)}"] = float(m.iqr) * 1e3
            out[f"latency_blocks_b{int(b)}"] = len(raw)
            logger.debug("batch %d: median %.4f ms, IQR %.4f ms, %d blocks of %d, %d threads", b,
                         out[f"latency_ms_b{int(b)}"], out[f"latency_iqr_ms_b{int(b)}"], len(raw),
                         m.number_per_run, n_threads)
    return out


def measure_latency(model: nn.Module, input_shape: Sequence[int], **options) -> dict[str, float]:
    """Median latency in milliseconds per batch size only (``{"latency_ms_b1": ..., ...}``); ``options`` and
    the spread: :func:`benchmark_latency`."""
    stats = benchmark_latency(model, input_shape, **options)
    return {k: v for k, v in stats.items() if k.startswith("latency_ms_b")}


PLAUSIBLE_FACTOR = 1.5
MIN_SPREAD = 0.05


def relative_spread(median_before: float, iqr_before: float, median_after: float, iqr_after: float) -> float:
    """Relative spread of the ratio of two medians: the sum of their relative IQRs, at least MIN_SPREAD."""
    rel = iqr_before / max(median_before, 1e-12) + iqr_after / max(median_after, 1e-12)
    return max(float(rel), MIN_SPREAD)


def check_speedup(speedup: float, spread: float, flops_ratio: float, unchanged: bool) -> str | None:
    """None when ``speedup`` lies in the plausibility band of ``flops_ratio`` (module docstring), else the
    reason, for the log and results.json's ``latency_warning``. ``spread``: :func:`relative_spread`."""
    if not math.isfinite(speedup) or speedup <= 0:
        return f"speed-up {speedup} is not a positive finite number"
    if unchanged:
        if abs(speedup - 1.0) > spread:
            return (f"the model is unchanged (same FLOPs and parameters) but its speed-up is {speedup:.3g}x, "
                    f"not 1 within the measurement's spread (+-{spread:.1%})")
        return None
    upper = PLAUSIBLE_FACTOR * max(flops_ratio, 1.0)
    lower = min(flops_ratio, 1.0) / PLAUSIBLE_FACTOR
    if speedup / (1.0 + spread) > upper:
        return (f"speed-up {speedup:.3g}x exceeds {PLAUSIBLE_FACTOR:g} x the FLOPs ratio {flops_ratio:.3g}x "
                f"(spread +-{spread:.1%}): likely a timing artefact")
    if speedup * (1.0 + spread) < lower:
        return (f"speed-up {speedup:.3g}x is below 1/{PLAUSIBLE_FACTOR:g} of min(FLOPs ratio {flops_ratio:.3g}x, "
                f"1) (spread +-{spread:.1%}): the pruned network is much slower than its FLOPs suggest")
    return None
