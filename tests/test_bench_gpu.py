"""scripts/bench_gpu.py runs where CI runs (no GPU): it says it found none, and prints both tables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="this is the check of the script's CPU fallback")
def test_bench_gpu_runs_on_cpu_and_says_so():
    out = subprocess.run([sys.executable, "scripts/bench_gpu.py", "--images", "64", "--batch", "32"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "no GPU found" in out.stdout
    assert "| dense |" in out.stdout and "| masked 90 % |" in out.stdout
    assert "throughput vectorized / sequential" in out.stdout
