"""Shared helpers for the benchmark scripts: machine description and interleaved median timing."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{cpu}; {os.cpu_count()} logical CPUs; torch {torch.__version__}; "
            f"threads {torch.get_num_threads()}; python {platform.python_version()}")


def interleaved(fns: dict[str, Callable[[], None]], repeats: int = 10, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, measured alternately (A B A B ...) so that drifts in the
    machine's speed hit every variant alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}
