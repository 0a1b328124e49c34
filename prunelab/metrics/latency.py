"""Cost metrics of a model: FLOPs, parameters and measured CPU latency.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode``, which counts a multiply-accumulate as 2
FLOPs (``2 * MACs``) for convolutions, ``mm`` / ``addmm`` / ``bmm`` and attention, and ignores elementwise
ops, BatchNorm, pooling and bias additions. Numbers are for ONE input sample unless ``batch_size`` is set.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
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


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _time_once(model: nn.Module, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    model(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def measure_latency(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1, 64),
    warmup: int = 3,
    repeats: int = 10,
    threads: int | None = None,
) -> dict[str, float]:
    """Median wall-clock latency in milliseconds of one forward pass (eval mode, ``no_grad``) per batch size.

    Returns ``{"latency_ms_b1": ..., "latency_ms_b64": ...}`` (one key per batch size). ``warmup`` untimed
    passes precede ``repeats`` timed ones; ``threads`` temporarily sets ``torch.set_num_threads``.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    device = _device(model)
    out: dict[str, float] = {}
    with _threads(threads), _eval_no_grad(model):
        for b in batch_sizes:
            x = torch.randn(int(b), *input_shape, device=device)
            for _ in range(max(0, warmup)):
                model(x)
            times = [_time_once(model, x) for _ in range(repeats)]
            out[f"latency_ms_b{int(b)}"] = float(statistics.median(times))
            logger.debug("batch %d: median %.3f ms over %d repeats", b, out[f"latency_ms_b{int(b)}"], repeats)
    return out
