"""``prunelab-eval`` on finished tiny runs (unstructured and structured): it reproduces the run's own
``final`` numbers, applies data overrides, writes eval.json and never results.json; ``model_final.pt``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prunelab.evaluate import evaluate, main
from prunelab.pipeline.run import run_pipeline
from tests.conftest import FAST, compose_config
from tests.test_cli import prunelab

ROOT = Path(__file__).resolve().parent.parent
SAME = ("test_acc", "test_loss", "sparsity_direct", "compression_direct", "sparsity_effective",
        "compression_effective", "layer_collapse", "params_total", "params_remaining", "flops_dense",
        "flops_remaining")


@pytest.fixture(scope="module")
def unstructured_run(tmp_path_factory) -> Path:
    """A run of the real CLI (its folder has ``.hydra/``)."""
    root = tmp_path_factory.mktemp("unstructured")
    out = prunelab(root, *FAST, "method=magnitude", "prune.sparsity=0.8", "measure.latency=false")
    assert out.returncode == 0, out.stderr[-3000:]
    (results,) = root.glob("outputs/runs/default/*/results.json")
    return results.parent


@pytest.fixture(scope="module")
def structured_run(tmp_path_factory) -> Path:
    """An in-process run (no ``.hydra/``: the config comes from results.json)."""
    root = tmp_path_factory.mktemp("structured")
    cfg = compose_config(root, FAST + ["model=lenet5", "method=l2_norm", "method.amount=0.5",
                                       "measure.latency=false"])
    run_pipeline(cfg)
    return Path(cfg.paths.output_dir)


KEPT_UNITS = ["model=resnet20", "data.input_shape=[3,32,32]", "method=bmrs_l2", "method.amount=0.5",
              "schedule=bayesian", "schedule.epochs=1", "measure.latency=false"]


@pytest.fixture(scope="module")
def compacted_with_kept_units(tmp_path_factory) -> Path:
    """A structured run whose compaction keeps pruned units, zero and masked: ResNet-20 with the authors' L2
    cut over half the units (residual-read units stay; a layer cut whole keeps one)."""
    root = tmp_path_factory.mktemp("kept_units")
    cfg = compose_config(root, FAST + KEPT_UNITS)
    run_pipeline(cfg)
    return Path(cfg.paths.output_dir)


def _final(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())["final"]


def test_model_final_file_of_an_unstructured_run(unstructured_run):
    saved = torch.load(unstructured_run / "model_final.pt", weights_only=True)  # tensors and plain types only
    assert set(saved) == {"state_dict", "masks", "model_config", "input_shape", "num_classes"}
    assert saved["model_config"]["name"] == "lenet_300_100" and saved["input_shape"] == [1, 28, 28]
    assert saved["num_classes"] == 10
    kept = sum(int(m.sum()) for m in saved["masks"].values())
    total = sum(m.numel() for m in saved["masks"].values())
    assert 1 - kept / total == pytest.approx(0.8, abs=1e-3)
    for name, mask in saved["masks"].items():  # pruned weights are zero in the saved state
        assert not saved["state_dict"][name][~mask.bool()].any()


def test_eval_reproduces_an_unstructured_run(unstructured_run):
    results_before = (unstructured_run / "results.json").read_bytes()
    record = evaluate(unstructured_run)
    final, got = _final(unstructured_run), record["metrics"]
    for key in SAME:
        assert got[key] == final[key], key
    assert record["source"].endswith("model_final.pt")
    assert json.loads((unstructured_run / "eval.json").read_text())["metrics"] == got
    assert (unstructured_run / "results.json").read_bytes() == results_before


def test_eval_reproduces_a_structured_run(structured_run):
    record = evaluate(structured_run)
    final, got = _final(structured_run), record["metrics"]
    assert record["source"].endswith("model_compact.pt")
    for key in SAME[:-5] + ("params_total", "params_remaining", "flops_dense", "flops_remaining", "flops_ratio"):
        assert got[key] == final[key], key
    assert 0.2 < got["sparsity_direct"] < 1


def test_eval_data_overrides(unstructured_run, tmp_path):
    run_cfg = json.loads((unstructured_run / "results.json").read_text())["config"]
    out = tmp_path / "other.json"
    record = evaluate(unstructured_run / "model_final.pt", ["data.num_test=128", "data.eval_batch_size=16",
                                                            "trainer.limit_test_batches=null"], output=out)
    assert out.is_file() and record["config"]["data"]["num_test"] == 128
    assert record["config"]["trainer"]["limit_test_batches"] is None
    # the whole 128-sample test set in batches of 16: accuracy is a multiple of 1/128, not of 1/32
    assert round(record["metrics"]["test_acc"] * 128, 6).is_integer()
    # a group choice composes that option; its interpolations resolve against the run's paths and seed
    record = evaluate(unstructured_run, ["data=synthetic", "measure.latency=false"], output=out)
    assert record["config"]["data"]["num_test"] == 512 and record["config"]["data"]["num_train"] == 2048
    assert record["config"]["data"]["data_dir"] == run_cfg["paths"]["data_dir"]
    assert record["config"]["data"]["seed"] == run_cfg["seed"]
    # the run's own data node keeps its interpolations: moving paths.data_dir moves data.data_dir
    record = evaluate(unstructured_run, ["paths.data_dir=/elsewhere/data", "measure.latency=false"], output=out)
    assert record["config"]["data"]["data_dir"] == "/elsewhere/data"


def test_eval_errors(unstructured_run, tmp_path):
    with pytest.raises(ValueError, match="'prune.sparsity=0.5' cannot be changed when evaluating a saved model; "
                                         "allowed: data, trainer, paths, measure"):
        evaluate(unstructured_run, ["prune.sparsity=0.5"])
    with pytest.raises(ValueError, match=r"data.batch_sz is not a key of the run's config"):
        evaluate(unstructured_run, ["data.batch_sz=3"])
    with pytest.raises(ValueError, match=r"model_final.pt expects inputs of shape \[1, 28, 28\], the data gives "
                                         r"\[1, 8, 8\]"):
        evaluate(unstructured_run, ["data=digits"])
    loose = tmp_path / "model_final.pt"
    shutil.copy(unstructured_run / "model_final.pt", loose)
    with pytest.raises(ValueError, match="no run config found next to the model file; give the data"):
        evaluate(loose)
    with pytest.raises(ValueError, match="no run config found next to the model file"):
        evaluate(tmp_path)  # a folder with a model file only
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no model: expected one of model_final.pt"):
        evaluate(tmp_path / "empty")


def test_eval_of_a_model_file_without_its_run(unstructured_run, tmp_path):
    loose = tmp_path / "model_final.pt"
    shutil.copy(unstructured_run / "model_final.pt", loose)
    record = evaluate(loose, ["data=synthetic", "data.num_train=256", "data.num_test=64",
                              "trainer.limit_test_batches=1", "measure.latency=false"])
    final = _final(unstructured_run)
    assert record["run_dir"] is None and (tmp_path / "eval.json").is_file()
    for key in ("sparsity_direct", "sparsity_effective", "params_remaining", "flops_remaining", "test_acc"):
        assert record["metrics"][key] == final[key], key  # the same data (same seed), so the same numbers


@pytest.mark.slow
def test_prunelab_eval_command(structured_run):
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", "from prunelab.evaluate import main; main()", str(structured_run),
                          "measure.latency=true", "measure.repeats=2", "measure.batch_sizes=[1]"],
                         env=env, cwd=structured_run.parent, text=True, capture_output=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads((structured_run / "eval.json").read_text())
    assert record["metrics"]["latency_ms_b1_after"] > 0 and record["metrics"]["speedup_b1"] > 0
    assert "test_acc" in out.stdout and str(structured_run / "eval.json") in out.stdout


def test_prunelab_eval_error_exit(structured_run, capsys):
    with pytest.raises(SystemExit) as code:
        main([str(structured_run), "method=snip"])
    assert code.value.code == 2
    assert "prunelab-eval: error: 'method=snip' cannot be changed" in capsys.readouterr().err



def test_eval_reproduces_a_compacted_run_that_keeps_pruned_units(compacted_with_kept_units):
    """model_compact.pt is the bare module: the masks of the pruned units it still holds come from the run's
    stage record, so the eval counts them as removed and finds the same effective sparsity (and collapse) as
    the run did, not the 1 - after/before of a dense network."""
    run = compacted_with_kept_units
    doc = json.loads((run / "results.json").read_text())
    assert doc["stages"]["prune"]["method"]["units_masked_not_removed"] > 0
    final = doc["final"]
    assert final["sparsity_direct"] > 1 - final["params_after"] / final["params_before"]  # kept units counted
    record = evaluate(run)
    assert record["source"].endswith("model_compact.pt")
    written = json.loads((run / "eval.json").read_text())["metrics"]  # as results.json: inf written as null
    for key in SAME:
        assert written[key] == final[key], key


def test_kept_units_stay_pruned_through_over_parameterized_fine_tuning(tmp_path):
    """Over-parameterized fine-tuning trains expanded layers, where the compaction's masks cannot be enforced,
    and with ``remask: false`` keeps the merged weights as trained. The units the compaction kept are part of
    the structure: they are zero again after the merge, so the final model is the one the run's figures
    describe (the eval of the saved model equals ``final``)."""
    cfg = compose_config(tmp_path, FAST + KEPT_UNITS + ["finetune=overparam", "finetune.remask=false",
                                                        "finetune.epochs=1"])
    run_pipeline(cfg)
    run = Path(cfg.paths.output_dir)
    final = json.loads((run / "results.json").read_text())["final"]
    kept = torch.load(run / "stages" / "prune.pt", weights_only=False)["masks"]
    model = torch.load(run / "model_compact.pt", weights_only=False)
    assert kept and all(not model.get_parameter(n)[~m.bool()].any() for n, m in kept.items())
    evaluate(run)
    written = json.loads((run / "eval.json").read_text())["metrics"]
    for key in SAME:
        assert written[key] == final[key], key
