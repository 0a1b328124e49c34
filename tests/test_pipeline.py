"""End-to-end runs of the pipeline on tiny synthetic data, caching, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prunelab.pipeline.run import run_pipeline
from prunelab.pruning.masks import MaskSet
from tests.conftest import FULL

MODELS = [
    ("lenet_300_100", "[1,28,28]"),
    ("mlp", "[1,28,28]"),
    ("lenet5", "[1,28,28]"),
    ("vgg19", "[3,32,32]"),
    ("resnet18", "[3,32,32]"),
    ("resnet20", "[3,32,32]"),
    ("resnet56", "[3,32,32]"),
    ("resnet50", "[3,32,32]"),
]


@pytest.mark.parametrize("model,shape", MODELS)
def test_end_to_end_every_model(make_cfg, model, shape):
    cfg = make_cfg(f"model={model}", f"data.input_shape={shape}", "data.batch_size=8",
                   "trainer.limit_train_batches=1", "prune.sparsity=0.8")
    res = run_pipeline(cfg)
    final = res["final"]
    assert final["sparsity_direct"] == pytest.approx(0.8, abs=1e-3)
    assert final["sparsity_effective"] >= final["sparsity_direct"] - 1e-12
    assert 0.0 <= final["test_acc"] <= 1.0
    assert final["params_remaining"] < final["params_total"]
    assert final["flops_remaining"] < final["flops_dense"]
    data = json.loads(open(res["results_file"]).read())
    assert set(data) >= {"config", "final", "stages", "layers"}
    assert {"name", "shape", "numel", "remaining", "effective_remaining"} <= set(data["layers"][0])
    assert sum(r["numel"] - r["remaining"] for r in data["layers"]) == pytest.approx(
        0.8 * sum(r["numel"] for r in data["layers"]), abs=1)


def test_timm_model_end_to_end(make_cfg):
    res = run_pipeline(make_cfg("model=timm", "model.arch=resnet10t", "data.input_shape=[3,32,32]",
                                "data.batch_size=8", "trainer.limit_train_batches=1"))
    assert res["final"]["sparsity_direct"] == pytest.approx(0.9, abs=1e-3)


def test_results_json_contents(make_cfg):
    res = run_pipeline(make_cfg("prune.compression=20", "prune.sparsity=null"))
    final = res["final"]
    for key in ("test_acc", "sparsity_direct", "compression_direct", "params_total", "params_remaining",
                "flops_dense", "flops_remaining", "sparsity_effective", "compression_effective"):
        assert final[key] is not None, key
    assert final["compression_direct"] == pytest.approx(20, rel=1e-3)
    assert set(res["stages"]) == {"pretrain", "prune", "finetune"}
    assert "pretrain/test/acc" in res["stages"]["pretrain"]["metrics"]
    assert "finetune/test/acc" in res["stages"]["finetune"]["metrics"]
    assert "prune/sparsity/direct" in res["stages"]["prune"]["metrics"]
    assert res["config"]["prune"]["compression"] == 20


def test_final_model_respects_masks(make_cfg, tmp_path):
    res = run_pipeline(make_cfg("prune.sparsity=0.95", "finetune.epochs=2"))
    state = torch.load(tmp_path / "run" / "stages" / "finetune.pt", weights_only=False)
    masks = MaskSet.from_state_dict(state["masks"])
    for name, m in masks.items():
        assert torch.all(state["model"][name][~m] == 0)
    assert res["final"]["sparsity_direct"] == pytest.approx(0.95, abs=1e-3)


def test_cache_second_sparsity_does_not_pretrain(make_cfg, tmp_path):
    # full runs (no trainer.limit_*): debug-limited runs keep their dense model in the run folder
    r1 = run_pipeline(make_cfg(*FULL, "prune.sparsity=0.5", fast=False, output_dir=tmp_path / "a"))
    assert r1["stages"]["pretrain"]["cached"] is False
    r2 = run_pipeline(make_cfg(*FULL, "prune.sparsity=0.9", "method=random", fast=False, output_dir=tmp_path / "b"))
    assert r2["stages"]["pretrain"]["cached"] is True
    assert r2["stages"]["pretrain"]["metrics"] == r1["stages"]["pretrain"]["metrics"]
    # another seed is another dense model
    r3 = run_pipeline(make_cfg(*FULL, "prune.sparsity=0.9", "seed=1", fast=False, output_dir=tmp_path / "c"))
    assert r3["stages"]["pretrain"]["cached"] is False
    assert len(list((tmp_path / "outputs" / "cache" / "dense").iterdir())) == 2


def test_rerun_skips_finished_stages(make_cfg, tmp_path):
    cfg = make_cfg()
    r1 = run_pipeline(cfg)
    r2 = run_pipeline(make_cfg())  # finished: nothing runs, the stored results come back
    assert r2["final"] == r1["final"] and r2["skipped"] is True
    (tmp_path / "run" / "results.json").unlink()  # only the last step lost: stages are loaded, not re-run
    r3 = run_pipeline(make_cfg())
    assert r3["final"] == r1["final"] and "skipped" not in r3
    assert r3["stages"]["pretrain"]["cached"] is True


def test_resume_interrupted_finetune(make_cfg, tmp_path):
    overrides = ["finetune.epochs=3", "+callbacks.interrupt._target_=tests.helpers.Interrupt",
                 "+callbacks.interrupt.epoch=2"]
    cfg = make_cfg(*overrides)
    with pytest.raises(RuntimeError, match="simulated pre-emption"):
        run_pipeline(cfg)
    last = tmp_path / "run" / "checkpoints" / "finetune" / "last.ckpt"
    assert last.exists()
    ck = torch.load(last, weights_only=False)
    assert ck["epoch"] == 1  # two epochs done (0-based index of the last finished one)
    assert "prunelab_masks" in ck
    assert not (tmp_path / "run" / "results.json").exists()
    # resume without the interruption: fine-tuning continues at epoch 3, pruning is not redone
    cfg = make_cfg("finetune.epochs=3")
    res = run_pipeline(cfg)
    assert res["final"]["sparsity_direct"] == pytest.approx(0.9, abs=1e-3)
    assert not last.exists()  # checkpoints of a finished stage are cleaned up
    assert res["stages"]["pretrain"]["cached"] is True


def test_at_init_and_iterative_schedules(make_cfg, tmp_path):
    r = run_pipeline(make_cfg("schedule=at_init", "method=random", "allocation=uniform", output_dir=tmp_path / "a"))
    assert "pretrain" not in r["stages"]
    assert r["final"]["sparsity_direct"] == pytest.approx(0.9, abs=1e-3)
    r = run_pipeline(make_cfg("schedule=iterative", "schedule.rounds=3", "prune.sparsity=0.875",
                              "schedule.round_epochs=1", output_dir=tmp_path / "b"))
    sp = [r["stages"][f"prune_round{i}"]["metrics"]["prune/sparsity/direct"] for i in (1, 2, 3)]
    assert sp == pytest.approx([0.5, 0.75, 0.875], abs=1e-3)  # geometric in density: 1/2, 1/4, 1/8
    assert r["final"]["sparsity_direct"] == pytest.approx(0.875, abs=1e-3)


def test_iterative_rewinds_to_init(make_cfg, tmp_path):
    r = run_pipeline(make_cfg("schedule=iterative", "schedule.rounds=1", "schedule.rewind_epoch=0",
                              "finetune.epochs=0", "prune.sparsity=0.5"))
    init = torch.load(Path(r["stages"]["pretrain"]["dir"]) / "init.pt")
    final = torch.load(tmp_path / "run" / "stages" / "finetune.pt", weights_only=False)
    masks = final["masks"]
    for name, m in masks.items():
        assert torch.equal(final["model"][name], init[name] * m)
    assert r["final"]["sparsity_direct"] == pytest.approx(0.5, abs=1e-3)


def test_output_dir_of_another_config_is_refused(make_cfg):
    run_pipeline(make_cfg("prune.sparsity=0.5"))
    with pytest.raises(ValueError, match="another configuration"):
        run_pipeline(make_cfg("prune.sparsity=0.6"))


@pytest.mark.parametrize("method,allocation", [("random", "igq"), ("snip", "global"), ("synflow", "global"),
                                               ("grasp", "global"), ("lamp", "global"), ("random", "erk")])
def test_pai_methods_and_effective_target(make_cfg, tmp_path, method, allocation):
    over = [f"method={method}", f"allocation={allocation}", "schedule=at_init", "prune.sparsity=0.97",
            "model=lenet_300_100"]
    if method == "synflow":
        over.append("method.rounds=10")
    direct = run_pipeline(make_cfg(*over, output_dir=tmp_path / "d"))["final"]
    assert direct["sparsity_direct"] == pytest.approx(0.97, abs=2e-3)
    eff = run_pipeline(make_cfg(*over, "prune.target=effective", output_dir=tmp_path / "e"))
    final = eff["final"]
    assert final["sparsity_effective"] >= 0.97 - 1e-9
    info = eff["stages"]["prune"]["target_info"]
    assert final["sparsity_direct"] == pytest.approx(info["sparsity_direct_needed"], abs=1e-6)
    assert final["sparsity_direct"] <= 0.97 + 1e-4  # no more removals than the direct target (+ quota rounding)


@pytest.mark.parametrize("strategy", ["overparam", "overparam_spkd"])
def test_overparam_finetuning_strategies(make_cfg, tmp_path, strategy):
    over = ["model=lenet5", f"finetune={strategy}", "finetune.expand_ratio=2", "prune.sparsity=0.5",
            "finetune.epochs=1"] + (["finetune.positions=expanded"] if strategy == "overparam_spkd" else [])
    res = run_pipeline(make_cfg(*over, "finetune.remask=true", "logger=csv", output_dir=tmp_path / "r"))
    info = res["stages"]["finetune"]["strategy"]
    assert info["params_after_merge"] == info["params_compact"] < info["params_expanded"]
    assert res["final"]["params_total"] == info["params_compact"]
    assert res["final"]["sparsity_direct"] == pytest.approx(0.5, abs=1e-3)  # re-masked after the merge
    if strategy == "overparam_spkd":
        assert info["spkd"]["gamma"] == 3000.0
        assert set(info["spkd"]["positions"]) == set(info["expanded_layers"])
        import pandas as pd

        logged = pd.read_csv(tmp_path / "r" / "csv" / "metrics.csv")
        assert logged["finetune/train/extra_loss"].dropna().iloc[-1] > 0  # the SP-KD term was trained on
    res = run_pipeline(make_cfg(*over, output_dir=tmp_path / "n"))
    assert res["final"]["sparsity_direct"] < 0.5  # merged weights are dense without re-masking


def test_overparam_spkd_needs_a_teacher(make_cfg):
    with pytest.raises(ValueError, match="needs the dense teacher"):
        run_pipeline(make_cfg("finetune=overparam_spkd", "schedule=at_init", "model=lenet5"))
