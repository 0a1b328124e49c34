"""Structured pruning through the pipeline: method=<criterion> with schedule=oneshot / iterative_structured,
compaction before fine-tuning, cost before/after in results.json, saved compact model, early errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from prunelab.pipeline.run import run_pipeline

MEASURE = ["measure.repeats=1", "measure.warmup=0", "measure.batch_sizes=[1,4]"]


def test_oneshot_structured_compacts_and_reports_cost(make_cfg, tmp_path):
    cfg = make_cfg("model=resnet20", "method=l2_norm", "schedule=oneshot", "method.amount=0.5",
                   "method.target_kind=flops", *MEASURE)
    res = run_pipeline(cfg)
    final = res["final"]
    assert final["target"] == "structured_flops" and final["sparsity_target"] == 0.5
    # FLOPs removed reach the target (the pruner stops at the first unit that reaches it)
    assert 1 - final["flops_after"] / final["flops_before"] >= 0.5 - 1e-9
    assert final["flops_ratio"] == pytest.approx(final["flops_before"] / final["flops_after"])
    assert final["params_after"] < final["params_before"] == final["params_total"]
    assert final["params_remaining"] == final["params_after"]
    assert final["sparsity_direct"] == pytest.approx(1 - final["params_after"] / final["params_before"])
    for b in (1, 4):
        assert final[f"latency_ms_b{b}_before"] > 0 and final[f"latency_ms_b{b}_after"] > 0
        assert final[f"speedup_b{b}"] == pytest.approx(final[f"latency_ms_b{b}_before"] /
                                                      final[f"latency_ms_b{b}_after"])
    info = res["stages"]["prune"]["method"]
    assert info["criterion"] == "l2_norm" and info["units_removed"] > 0
    # the saved model is the compact one, loads without prunelab surgery, and has the reported size
    model = torch.load(cfg.paths.output_dir + "/model_compact.pt", weights_only=False)
    assert sum(p.numel() for p in model.parameters()) == final["params_after"]
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_iterative_structured_removes_k_every_frequency_until_target(make_cfg):
    cfg = make_cfg("model=lenet5", "method=taylor_fo", "schedule=iterative_structured", "schedule.frequency=2",
                   "schedule.k=10", "schedule.epochs=20", "method.target_kind=units", "method.amount=45", *MEASURE)
    res = run_pipeline(cfg)
    hist = res["stages"]["prune"]["method"]["history"]
    assert [h["batch"] for h in hist] == [2 * (i + 1) for i in range(len(hist))]
    assert [h["removed"] for h in hist] == [10, 10, 10, 10, 5]   # the last step stops at the target
    assert res["stages"]["prune"]["method"]["units_removed"] == 45
    assert all(h["ranks_agree"] for h in hist)
    # the stage stopped once the target was reached: 10 batches, not 20 epochs x 2 batches
    assert res["stages"]["prune"]["metrics"]["prune/structure/units_removed"] == 45


def test_iterative_structured_params_target_and_resume(make_cfg):
    over = ["model=lenet5", "method=taylor_fo_weight", "schedule=iterative_structured", "schedule.frequency=1",
            "schedule.k=20", "method.target_kind=params", "method.amount=0.4", *MEASURE]
    cfg = make_cfg(*over)
    res = run_pipeline(cfg)
    assert 1 - res["final"]["params_after"] / res["final"]["params_before"] >= 0.4
    # a re-run with the fine-tuning stage gone reloads the compact pruned model and fine-tunes it again
    from pathlib import Path

    run_dir = Path(cfg.paths.output_dir)
    for f in ["results.json", "stages/finetune.json", "stages/finetune.pt"]:
        (run_dir / f).unlink()
    again = run_pipeline(make_cfg(*over))
    assert again["final"]["params_after"] == res["final"]["params_after"]
    assert again["stages"]["prune"]["metrics"] == res["stages"]["prune"]["metrics"]


@pytest.mark.parametrize("criterion", ["taylor_so", "bn_scale", "random_structured", "oracle"])
def test_other_criteria_run_oneshot(make_cfg, criterion):
    model = "resnet20" if criterion == "bn_scale" else "lenet5"
    extra = ["prune.score_batches=1", "data.batch_size=8"] if criterion == "oracle" else []
    res = run_pipeline(make_cfg(f"model={model}", f"method={criterion}", "method.amount=0.3",
                                "method.target_kind=units", *extra, *MEASURE, "measure.latency=false"))
    assert res["stages"]["prune"]["method"]["units_removed"] > 0
    assert "latency_ms_b1_before" not in res["final"]
    assert res["final"]["params_after"] < res["final"]["params_before"]
    # one name system: the option the run was configured with names it (not the criterion, "random")
    info = res["stages"]["prune"]["method"]
    assert info["name"] == criterion == res["choices"]["method"]
    assert info["criterion"] == {"random_structured": "random"}.get(criterion, criterion)


@pytest.mark.parametrize("overrides, message", [
    (["method=taylor_fo", "schedule=at_init"], "allowed schedules: train_prune, iterative_structured"),
    (["method=magnitude", "schedule=iterative_structured"], "needs a method that prunes during training"),
    (["method=taylor_fo", "method.target_kind=filters"], "method.target_kind='filters'; allowed values"),
    (["method=taylor_fo", "method.amount=1.5"], "method.amount=1.5"),
    (["method=taylor_fo", "method.criterion=taylor_xx"], "allowed values: taylor_fo"),
    (["method=taylor_fo", "method.residual_gates=stage"], "method.residual_gates='stage'; allowed values: producers"),
    (["model=lenet5", "method=taylor_fo", "method.residual_gates=block_output"], "no residual-coupled channel group"),
    (["method=taylor_fo", "schedule=iterative_structured", "schedule.recipe=x"], "schedule.recipe='x'"),
])
def test_bad_structured_options_fail_before_training(make_cfg, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        run_pipeline(make_cfg(*overrides))
    assert not list(tmp_path.rglob("dense"))  # nothing was trained


@pytest.mark.slow
def test_iterative_structured_ddp_two_processes(tmp_path):
    from tests.test_cli import FAST as FAST_CLI
    from tests.test_cli import prunelab as prunelab_cli

    out = prunelab_cli(tmp_path, *FAST_CLI, "trainer=ddp_cpu", "logger=none", "model=lenet5", "method=taylor_fo",
                       "schedule=iterative_structured", "schedule.frequency=1", "schedule.k=10",
                       "method.target_kind=units", "method.amount=30", *MEASURE, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    files = sorted(tmp_path.glob("outputs/**/results.json"))
    res = json.loads(files[0].read_text())
    hist = res["stages"]["prune"]["method"]["history"]
    assert hist and all(h["ranks_agree"] for h in hist)
    assert res["stages"]["prune"]["method"]["units_removed"] == 30


def test_compact_model_runs_in_a_fresh_process(make_cfg, tmp_path):
    cfg = make_cfg("model=lenet5", "method=l2_norm", "method.amount=0.5", *MEASURE, "measure.latency=false")
    run_pipeline(cfg)
    code = ("import torch; m = torch.load(%r, weights_only=False); print(m(torch.zeros(1, 1, 28, 28)).shape)"
            % (cfg.paths.output_dir + "/model_compact.pt"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([1, 10])" in out.stdout


def test_taylor_resnet50_overlay_composes(make_cfg):
    cfg = make_cfg("experiment=taylor_resnet50_imagenet", "model.weights=/x.pth", fast=False)
    assert cfg.method.criterion == "taylor_fo" and cfg.method.target_kind == "units"
    assert cfg.schedule.frequency == 30 and cfg.schedule.k == 100 and cfg.pretrain.epochs == 0
    assert cfg.data.image_size == 224 and cfg.model.name == "resnet50"
    assert cfg.finetune.optimizer.lr == 0.001 and cfg.finetune.optimizer.weight_decay == 0.0
    assert cfg.method.residual_gates == "block_output"  # the reference code's gates (prunelab's default below)
    assert make_cfg("method=taylor_fo").method.residual_gates == "producers"


def test_block_output_gates_run_oneshot_and_keep_the_stem(make_cfg, tmp_path):
    cfg = make_cfg("model=resnet20", "method=taylor_fo", "schedule=oneshot", "method.amount=0.3",
                   "method.target_kind=units", "method.residual_gates=block_output", *MEASURE)
    res = run_pipeline(cfg)
    assert res["stages"]["prune"]["method"]["units_removed"] > 0
    model = torch.load(cfg.paths.output_dir + "/model_compact.pt", weights_only=False)
    assert model.conv1.out_channels == 16 and model.layer1[0].conv2.out_channels == 16  # stem (+ stage 1) kept
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_model_weights_option(tmp_path):
    from prunelab.models import build_model

    a = build_model("lenet5", (1, 28, 28), 10)
    torch.save(a.state_dict(), tmp_path / "w.pt")
    b = build_model("lenet5", (1, 28, 28), 10, weights=str(tmp_path / "w.pt"))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ValueError, match="does not match model=vgg19"):
        build_model("vgg19", (3, 32, 32), 10, weights=str(tmp_path / "w.pt"))
    with pytest.raises(FileNotFoundError, match="model.weights="):
        build_model("lenet5", (1, 28, 28), 10, weights=str(tmp_path / "missing.pt"))
