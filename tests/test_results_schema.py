"""results.json is a contract: every schedule kind writes a file valid against prunelab/results_schema.json
(the test suite runs with PRUNELAB_STRICT_RESULTS=1, so every results.json any test writes is validated),
stages.prune has the same keys whatever the schedule, non-finite numbers are null plus a flag, provenance
(schema and prunelab versions, git commit, torch, threads, determinism, option names) is recorded, and the
hyper-parameter search optimizes a validation metric, never test accuracy."""

from __future__ import annotations

import copy
import json
import logging
import math
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from omegaconf import OmegaConf

import prunelab.runinfo as runinfo
from prunelab.pipeline.run import STRICT_ENV, check_results, final_metrics, objective, run_pipeline
from prunelab.results import SCHEMA_VERSION, schema, schema_errors
from prunelab.utils.io import atomic_write_json
from tests.test_cli import FAST as CLI_FAST
from tests.test_cli import prunelab

# one run of every schedule kind (cheap settings); the cache is shared so the dense model trains once
KINDS = {
    "oneshot": [],
    "at_init": ["schedule=at_init", "method=snip"],
    "iterative": ["schedule=iterative", "schedule.rounds=2"],
    "train_prune": ["model=lenet5", "method=taylor_fo", "schedule=iterative_structured", "schedule.epochs=1",
                    "method.amount=0.3", "measure.batch_sizes=[1]", "measure.min_run_time=0.01",
                    "measure.repeats=2"],
    "bayesian": ["model=lenet5", "method=bmrs_u", "schedule=bayesian", "schedule.epochs=1",
                 "measure.latency=false"],
    "dllp": ["model=lenet5", "method=dllp", "schedule=train_prune", "schedule.epochs=1", "method.particles=2",
             "measure.latency=false", "method.reliability_batches=1", "prune.sparsity=0.5"],
}


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def kind_results():
    return {}


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_schedule_kind_writes_a_valid_results_json(make_cfg, shared_cache, kind_results, kind, monkeypatch):
    monkeypatch.setenv(STRICT_ENV, "1")
    cfg = make_cfg(*KINDS[kind], f"paths.cache_dir={shared_cache}")
    res = run_pipeline(cfg)
    written = json.loads(Path(res["results_file"]).read_text())
    assert schema_errors(written) == []
    assert written["schema_version"] == SCHEMA_VERSION
    # the option names the run was started with
    expected = {"oneshot": "magnitude", "at_init": "snip", "iterative": "magnitude", "train_prune": "taylor_fo",
                "bayesian": "bmrs_u", "dllp": "dllp"}[kind]
    assert written["choices"]["method"] == expected
    assert written["choices"]["schedule"] == {"oneshot": "oneshot", "at_init": "at_init", "iterative": "iterative",
                                              "train_prune": "iterative_structured", "bayesian": "bayesian",
                                              "dllp": "train_prune"}[kind]
    env = written["environment"]
    assert env["num_threads"] >= 1 and isinstance(env["deterministic_algorithms"], bool)
    assert env["torch"] and env["prunelab_version"]
    # the validation accuracy of the fine-tuning stage is recorded (stage record and final)
    ft = written["stages"]["finetune"]["metrics"]
    assert 0 <= ft["finetune/val/acc_best"] <= 1 and ft["finetune/val/acc_last"] <= ft["finetune/val/acc_best"]
    assert written["final"]["val_acc_best"] == ft["finetune/val/acc_best"]
    kind_results[kind] = written


def test_prune_stage_keys_do_not_depend_on_the_schedule(kind_results):
    if not {"oneshot", "iterative"} <= set(kind_results):
        pytest.skip("needs the oneshot and iterative runs of test_every_schedule_kind_writes_a_valid_results_json")
    one, it = kind_results["oneshot"]["stages"], kind_results["iterative"]["stages"]
    assert set(one["prune"]["metrics"]) == set(it["prune"]["metrics"])
    assert all(k.startswith("prune/") for k in it["prune"]["metrics"])
    # the rounds keep their records, with the same key names and their round
    for r in (1, 2):
        assert set(it[f"prune_round{r}"]["metrics"]) == set(one["prune"]["metrics"])
        assert it[f"prune_round{r}"]["round"] == r
    assert it["prune"]["round"] == 2 and it["retrain_round1"]["round"] == 1
    assert it["prune_round1"]["metrics"]["prune/sparsity/direct"] < it["prune"]["metrics"]["prune/sparsity/direct"]


def _valid_doc(kind_results=None) -> dict:
    """A valid results document (from a real run when available)."""
    if kind_results and "oneshot" in kind_results:
        return copy.deepcopy(kind_results["oneshot"])
    from tests.test_report import results_doc

    return results_doc(Path("/tmp/x"), "magnitude", 10.0, 0, 0.9)


def test_schema_rejects_what_the_contract_forbids(kind_results):
    doc = _valid_doc(kind_results)
    assert schema_errors(doc) == []
    bad = copy.deepcopy(doc)
    bad["final"]["compression_effective"] = "inf"  # the pre-contract way of writing infinity
    assert any("compression_effective" in e for e in schema_errors(bad))
    bad = copy.deepcopy(doc)
    bad["final"]["compression_effective"] = None  # null without the collapse flag
    assert schema_errors(bad)
    bad = copy.deepcopy(doc)
    bad["final"]["layer_collapse"], bad["final"]["compression_effective"] = True, None
    assert schema_errors(bad) == []
    bad = copy.deepcopy(doc)
    bad["stages"]["prune_round1"] = {"metrics": {"prune_round1/test/acc": 0.5}, "round": 1}
    assert any("prune_round1" in e for e in schema_errors(bad))
    for key in ("schema_version", "environment", "choices", "final"):
        bad = copy.deepcopy(doc)
        del bad[key]
        assert any(key in e for e in schema_errors(bad)), key
    bad = copy.deepcopy(doc)
    bad["unknown_key"] = 1
    assert schema_errors(bad)
    bad = copy.deepcopy(doc)
    bad["final"]["speedup_plausible"] = False  # a flagged speed-up must say why
    assert any("latency_warning" in e for e in schema_errors(bad))
    assert schema()["properties"]["schema_version"] == {"const": SCHEMA_VERSION}


def test_check_results_raises_when_strict_and_logs_otherwise(monkeypatch, caplog):
    bad = _valid_doc()
    del bad["environment"]
    monkeypatch.setenv(STRICT_ENV, "1")
    with pytest.raises(ValueError, match="environment"):
        check_results(bad)
    monkeypatch.setenv(STRICT_ENV, "0")
    with caplog.at_level(logging.ERROR, logger="prunelab.pipeline.run"):
        check_results(bad)
    assert any("does not match its schema" in r.getMessage() for r in caplog.records)


def test_non_finite_values_are_null_with_a_flag(tmp_path):
    ctx = SimpleNamespace(
        stages={"prune": {"metrics": {"prune/sparsity/effective": 1.0, "prune/compression/effective": math.inf,
                                      "prune/layer_collapse": 1.0, "prune/params/total": 10,
                                      "prune/test/loss": math.nan, "prune/test/acc": 0.1}}},
        sparsity=0.99, cfg=OmegaConf.create({"prune": {"target": "direct"}}), scorer=None, extra_final={})
    final = final_metrics(ctx)
    assert final["layer_collapse"] is True and final["compression_effective"] == math.inf
    assert final["nonfinite"] == {"compression_effective": "inf", "test_loss": "nan"}
    atomic_write_json({"final": final}, tmp_path / "r.json")
    text = (tmp_path / "r.json").read_text()
    assert "Infinity" not in text and '"inf"' in text  # only inside the flag map
    back = json.loads(text)["final"]
    assert back["compression_effective"] is None and back["test_loss"] is None
    from prunelab.report.collect import read_final

    restored = read_final(back)
    assert restored["compression_effective"] == math.inf and math.isnan(restored["test_loss"])


def test_git_commit_of_the_source_tree(monkeypatch, tmp_path):
    root = Path(runinfo.__file__).resolve().parent.parent
    if (root / ".git").exists():
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        assert runinfo.git_state()["commit"] == head.strip()
    # an installed copy (no .git next to it) records null, not the commit of a surrounding repository
    monkeypatch.setattr(runinfo, "_SOURCE_ROOT", tmp_path)
    assert runinfo.git_state() == {"commit": None, "dirty": None}
    env = runinfo.environment(OmegaConf.create({"trainer": {"deterministic": True}}))
    assert env["git_commit"] is None and env["trainer_deterministic"] is True


def test_choices_come_from_the_config_when_it_holds_hydra(make_cfg):
    from hydra import compose, initialize_config_dir

    from prunelab.cli import CONFIG_DIR

    make_cfg("method=snip")  # sets the global Hydra config to another choice
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["method=bmrs_n", "allocation=igq"], return_hydra_config=True)
    choices = runinfo.hydra_choices(cfg)
    assert choices["method"] == "bmrs_n" and choices["allocation"] == "igq"
    assert not any(k.startswith("hydra") for k in choices)
    assert list(choices)[:3] == ["method", "allocation", "schedule"]


# the hyper-parameter search ---------------------------------------------------------------------------
def _results(val_best=0.6, val_last=0.55, test=0.8):
    return {"final": {"test_acc": test, "val_acc_best": val_best},
            "stages": {"finetune": {"metrics": {"finetune/val/acc_best": val_best, "finetune/val/acc_last": val_last,
                                                "finetune/test/acc": test}}}}


def test_objective_is_the_validation_metric_not_test_accuracy():
    res = _results()
    assert objective(res, OmegaConf.create({"optimized_metric": None})) == 0.6
    assert objective(res, OmegaConf.create({"optimized_metric": "finetune/val/acc_last"})) == 0.55
    assert objective(res, OmegaConf.create({"optimized_metric": "val_acc_best"})) == 0.6
    assert objective(res, OmegaConf.create({})) != res["final"]["test_acc"]
    # not recorded (no validation ran): NaN, which Optuna records as a failed trial
    assert math.isnan(objective({"final": {}, "stages": {}}, OmegaConf.create({"optimized_metric": "x/val/acc"})))


@pytest.mark.slow
def test_optuna_search_optimizes_the_recorded_validation_accuracy(tmp_path):
    """Two Optuna trials through the CLI: the best value Optuna saw is the best recorded
    finetune/val/acc_best of the trials, and differs from their test accuracies."""
    out = prunelab(tmp_path, *[o for o in CLI_FAST if not o.startswith("finetune.epochs")], "logger=none",
                   "hparams_search=finetune_optuna", "hydra.sweeper.n_trials=2", "name=optuna_test",
                   'hydra.sweeper.params={finetune.epochs:"choice(1,2)",finetune.optimizer.lr:"interval(0.01,0.1)"}',
                   "data.num_train=512", "trainer.limit_val_batches=2", timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    opt = next(tmp_path.glob("outputs/multirun/**/optimization_results.yaml"))
    best = yaml.safe_load(opt.read_text())["best_value"]
    runs = [json.loads(p.read_text()) for p in tmp_path.glob("outputs/multirun/**/results.json")]
    assert len(runs) == 2
    vals = [r["stages"]["finetune"]["metrics"]["finetune/val/acc_best"] for r in runs]
    tests = [r["final"]["test_acc"] for r in runs]
    assert best == pytest.approx(max(vals))
    assert all(v != t for v, t in zip(vals, tests))  # this case tells validation from test accuracy
    assert not any(best == pytest.approx(t) for t in tests)
