"""Cost metrics: latency measured with torch.utils.benchmark (median, IQR, threads), the plausibility band of
a speed-up against the FLOPs ratio (in the log and in results.json), and FLOPs of unstructured masks.

No assertion depends on how fast this machine is: the measurement's structure is checked on real timings,
the plausibility rules on given numbers."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from prunelab.metrics.flops import flops_by_module, masked_flops
from prunelab.metrics.latency import (
    MIN_SPREAD,
    benchmark_latency,
    check_speedup,
    measure_latency,
    relative_spread,
)
from prunelab.pipeline.context import RunContext
from prunelab.pipeline.run import run_pipeline


def small_model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))


def test_benchmark_reports_median_spread_blocks_and_threads():
    out = benchmark_latency(small_model(), (3, 2, 2), batch_sizes=(1, 4), warmup=1, repeats=5, threads=1,
                            min_run_time=0.01)
    assert out["latency_threads"] == 1
    for b in (1, 4):
        assert out[f"latency_ms_b{b}"] > 0
        assert out[f"latency_iqr_ms_b{b}"] >= 0
        assert out[f"latency_blocks_b{b}"] >= 5  # at least `repeats` timed blocks
    assert set(measure_latency(small_model(), (3, 2, 2), batch_sizes=(1,), repeats=2, min_run_time=0.01)) == {
        "latency_ms_b1"}
    with pytest.raises(ValueError, match="min_run_time"):
        benchmark_latency(small_model(), (3, 2, 2), min_run_time=0)


def test_benchmark_runs_under_the_requested_threads_and_restores_them():
    before = torch.get_num_threads()
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(torch.get_num_threads())
            return x

    out = benchmark_latency(Probe().eval().requires_grad_(False).to(torch.float32), (2,), batch_sizes=(1,),
                            warmup=0, repeats=1, threads=1, min_run_time=0.001)
    assert out["latency_threads"] == 1 and set(seen) == {1}
    assert torch.get_num_threads() == before


def test_unchanged_model_is_flagged_only_outside_the_spread():
    # the same model timed twice: 1.08x apart with a 10% + 5% spread is noise, 1.3x with 2% + 2% is not
    spread = relative_spread(10.0, 1.0, 9.25, 0.46)
    assert spread == pytest.approx(0.1 + 0.46 / 9.25)
    assert check_speedup(10.0 / 9.25, spread, 1.0, unchanged=True) is None
    tight = relative_spread(10.0, 0.2, 7.7, 0.15)
    reason = check_speedup(10.0 / 7.7, tight, 1.0, unchanged=True)
    assert reason is not None and "unchanged" in reason
    # slower by as much is flagged too
    assert check_speedup(7.7 / 10.0, tight, 1.0, unchanged=True) is not None
    # the spread never counts as less than MIN_SPREAD: identical timings up to 5% are not flagged
    assert relative_spread(10.0, 0.0, 10.0, 0.0) == MIN_SPREAD
    assert check_speedup(1.04, MIN_SPREAD, 1.0, unchanged=True) is None


def test_speedup_outside_the_flops_band_is_flagged():
    # the case: 379x for a 2.5x FLOPs cut is a timing artefact
    reason = check_speedup(379.0, 0.1, 2.5, unchanged=False)
    assert reason is not None and "exceeds" in reason
    # up to 1.5 x the FLOPs ratio (plus the spread) is plausible; below it, down to 1 / 1.5, too
    assert check_speedup(2.0, 0.05, 2.5, unchanged=False) is None
    assert check_speedup(3.9, 0.05, 2.5, unchanged=False) is None
    assert check_speedup(4.2, 0.05, 2.5, unchanged=False) is not None
    assert check_speedup(0.7, 0.05, 2.5, unchanged=False) is None
    slow = check_speedup(0.5, 0.05, 2.5, unchanged=False)
    assert slow is not None and "slower" in slow
    # a wide spread widens the band
    assert check_speedup(4.2, 0.5, 2.5, unchanged=False) is None
    assert check_speedup(float("inf"), 0.05, 2.5, unchanged=False) is not None


def _ctx() -> RunContext:
    return RunContext.__new__(RunContext)  # structure_metrics needs no run state


def _cost(flops, params, med1, iqr1, threads=2):
    return {"params": params, "flops": flops, "latency_threads": threads, "latency_ms_b1": med1,
            "latency_iqr_ms_b1": iqr1, "latency_blocks_b1": 10}


def test_structure_metrics_record_spread_and_plausibility(caplog):
    ctx = _ctx()
    with caplog.at_level(logging.WARNING, logger="prunelab.pipeline.context"):
        m = ctx.structure_metrics(_cost(1000, 100, 10.0, 0.5), _cost(400, 40, 5.0, 0.25), "prune")
    s = "prune/structure"
    assert m[f"{s}/flops_ratio"] == 2.5 and m[f"{s}/speedup_b1"] == 2.0
    assert m[f"{s}/speedup_spread_b1"] == pytest.approx(0.1)
    assert m[f"{s}/latency_iqr_ms_b1_before"] == 0.5 and m[f"{s}/latency_iqr_ms_b1_after"] == 0.25
    assert m[f"{s}/latency_threads"] == 2
    assert m[f"{s}/speedup_plausible"] is True and m[f"{s}/latency_warning"] is None
    assert not caplog.records
    # 379x for a 2.5x FLOPs cut: flagged in the metrics and in the log
    with caplog.at_level(logging.WARNING, logger="prunelab.pipeline.context"):
        m = ctx.structure_metrics(_cost(1000, 100, 37.9, 0.5), _cost(400, 40, 0.1, 0.001), "prune")
    assert m[f"{s}/speedup_plausible"] is False and "exceeds" in m[f"{s}/latency_warning"]
    assert any("implausible latency" in r.getMessage() for r in caplog.records)
    # an unchanged model (same FLOPs and parameters) must time at 1x within the spread
    m = ctx.structure_metrics(_cost(1000, 100, 10.0, 0.1), _cost(1000, 100, 13.4, 0.1), "prune")
    assert m[f"{s}/speedup_plausible"] is False and "unchanged" in m[f"{s}/latency_warning"]
    m = ctx.structure_metrics(_cost(1000, 100, 10.0, 2.0), _cost(1000, 100, 11.0, 2.0), "prune")
    assert m[f"{s}/speedup_plausible"] is True
    # without latency: no plausibility keys
    m = ctx.structure_metrics({"params": 100, "flops": 1000}, {"params": 40, "flops": 400}, "prune")
    assert f"{s}/speedup_plausible" not in m


def test_pipeline_writes_the_latency_warning(make_cfg, monkeypatch):
    """A structured run whose (faked) timing is implausible says so in results.json's final block."""
    import prunelab.pipeline.context as context

    calls = []

    def fake(model, input_shape, batch_sizes, **kw):
        calls.append(kw)
        med = 100.0 if not calls[1:] else 0.01  # before: 100 ms, after: 0.01 ms -> 10000x
        return {"latency_threads": 1, **{f"latency_ms_b{b}": med for b in batch_sizes},
                **{f"latency_iqr_ms_b{b}": med / 100 for b in batch_sizes},
                **{f"latency_blocks_b{b}": 10 for b in batch_sizes}}

    monkeypatch.setattr(context, "benchmark_latency", fake)
    res = run_pipeline(make_cfg("model=lenet5", "method=l2_norm", "method.amount=0.5", "measure.batch_sizes=[1]",
                                "finetune.epochs=0", "measure.min_run_time=0.05"))
    final = res["final"]
    assert calls and calls[0]["min_run_time"] == 0.05
    assert final["speedup_b1"] == pytest.approx(1e4)
    assert final["speedup_plausible"] is False and "timing artefact" in final["latency_warning"]
    assert final["latency_iqr_ms_b1_before"] == 1.0 and final["latency_threads"] == 1


def test_unstructured_flops_scale_with_density():
    """A layer keeping a quarter of its weights keeps a quarter of its FLOPs (not three quarters)."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    total, per_module = flops_by_module(model, (8,))
    assert per_module["0"] == 2 * 8 * 16 and per_module["2"] == 2 * 16 * 4
    mask = torch.zeros(16, 8)
    mask.view(-1)[: 16 * 8 // 4] = 1  # density 0.25
    out = masked_flops(model, (8,), {"0.weight": mask})
    assert out["flops_dense"] == total
    assert out["flops_remaining"] == total - per_module["0"] + per_module["0"] // 4
    # both layers at density 0.1
    masks = {n: (torch.rand_like(p) < 0.1).float() for n, p in model.named_parameters() if n.endswith("weight")}
    dens = {n: float(m.mean()) for n, m in masks.items()}
    expected = total - per_module["0"] * (1 - dens["0.weight"]) - per_module["2"] * (1 - dens["2.weight"])
    assert masked_flops(model, (8,), masks)["flops_remaining"] == round(expected)
