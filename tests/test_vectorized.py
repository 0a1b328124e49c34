"""Vectorised sweeps (prunelab/vectorized): N copies trained as one vmapped model give each copy the results of
its separate pipeline run, one results.json per copy, the same dense cache; masks stay exact."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from prunelab.pipeline.run import run_pipeline
from prunelab.vectorized import run_vectorized
from prunelab.vectorized import train as vtrain
from prunelab.vectorized.stacked import StackedModel
from tests.conftest import compose_config
from tests.test_cli import FAST, prunelab

# Tiny synthetic data, hard enough that accuracy is not saturated (signal 0.3), whole epochs (no batch limit).
BASE = ["data=synthetic", "data.num_train=256", "data.num_test=128", "data.batch_size=32", "data.signal=0.3",
        "pretrain.epochs=2", "finetune.epochs=2", "trainer.enable_progress_bar=false", "logger=none"]
SEEDS, SPARSITIES = (0, 1, 2), (0.5, 0.9)
# One epoch each and no batch limit: not a debug run (FAST's trainer.limit_train_batches makes every run keep its
# dense model in its own folder), so runs share the dense cache under paths.cache_dir.
SHARED_CACHE = [o for o in BASE if not o.startswith(("pretrain.epochs=", "finetune.epochs="))] + [
    "pretrain.epochs=1", "finetune.epochs=1"]
# Why a tolerance: vmap runs copy k's x @ W.T as one batched matmul over the copies, whose kernel may sum the
# dot products in another order than the separate run's matmul; the optimiser and masks are element-wise
# (exact). Observed differences are ~4e-8 in the weights after 4 epochs.
ATOL = 1e-5


def configs(root: Path, overrides: list[str], grid: list[list[str]]):
    """Resolved configs of the jobs ``grid``, each in its own folder (named by its overrides), one cache."""
    out = []
    for extra in grid:
        cfg = compose_config(root, [*overrides, *extra], root / "runs" / "_".join(extra or ["default"]))
        OmegaConf.resolve(cfg)
        out.append(cfg)
    return out


def grid() -> list[list[str]]:
    return [[f"seed={s}", f"prune.sparsity={p}"] for s in SEEDS for p in SPARSITIES]


def weights(results: dict, stage: str) -> dict[str, torch.Tensor]:
    return torch.load(Path(results["results_file"]).parent / "stages" / f"{stage}.pt", weights_only=False)


def mismatches(separate: list[dict], vectorized: list[dict]) -> list[str]:
    """Every way the vectorised copies differ from the separate runs (empty: equivalent)."""
    bad = []
    for k, (a, b) in enumerate(zip(separate, vectorized)):
        if set(a) != set(b) or set(a["final"]) != set(b["final"]) or set(a["stages"]) != set(b["stages"]):
            bad.append(f"job {k}: results.json keys differ")
        fa, fb = a["final"], b["final"]
        for key in ("sparsity_direct", "sparsity_effective", "params_remaining", "flops_remaining",
                    "sparsity_target", "pretrain_test_acc", "prune_test_acc", "test_acc"):
            if fa[key] != fb[key]:
                bad.append(f"job {k}: final.{key} {fa[key]} != {fb[key]}")
        for key in ("test_loss",):
            if fa[key] != pytest.approx(fb[key], rel=1e-4, abs=1e-6):
                bad.append(f"job {k}: final.{key} {fa[key]} != {fb[key]}")
        for key in ("val_acc_best", "val_acc_last"):
            if fa[key] is None or fa[key] != fb[key]:
                bad.append(f"job {k}: final.{key} {fa[key]} != {fb[key]}")
        ma, mb = a["stages"]["finetune"]["metrics"], b["stages"]["finetune"]["metrics"]
        if set(ma) != set(mb):
            bad.append(f"job {k}: finetune metrics keys differ: {sorted(set(ma) ^ set(mb))}")
        for key in ("finetune/val/acc_best", "finetune/val/best_epoch", "finetune/val/acc_last"):
            if ma.get(key) is None or ma.get(key) != mb.get(key):
                bad.append(f"job {k}: finetune {key} {ma.get(key)} != {mb.get(key)}")
        if mb.get("finetune/val/loss_last") != pytest.approx(ma.get("finetune/val/loss_last"), rel=1e-4, abs=1e-6):
            bad.append(f"job {k}: finetune/val/loss_last {ma.get('finetune/val/loss_last')} != "
                       f"{mb.get('finetune/val/loss_last')}")
        if a["stages"]["finetune"]["strategy"] != b["stages"]["finetune"]["strategy"]:  # keep_best: best epoch
            bad.append(f"job {k}: finetune strategy record {a['stages']['finetune']['strategy']} != "
                       f"{b['stages']['finetune']['strategy']}")
        if a["stages"]["pretrain"]["cached"] != b["stages"]["pretrain"]["cached"]:
            bad.append(f"job {k}: pretrain cached flag differs")
        if a["stages"]["pretrain"].get("key") != b["stages"]["pretrain"].get("key"):
            bad.append(f"job {k}: dense cache key differs")
        wa, wb = weights(a, "finetune"), weights(b, "finetune")
        for name in wa["masks"]:
            if not torch.equal(wa["masks"][name], wb["masks"][name]):
                bad.append(f"job {k}: mask {name} differs")
        for name, t in wa["model"].items():
            if not torch.allclose(t, wb["model"][name], atol=ATOL, rtol=0):
                bad.append(f"job {k}: final weight {name} differs by {float((t - wb['model'][name]).abs().max())}")
    return bad


@pytest.fixture(scope="module")
def separate(tmp_path_factory):
    root = tmp_path_factory.mktemp("separate")
    return root, [run_pipeline(cfg) for cfg in configs(root, BASE, grid())]


def vectorized(root: Path, overrides=BASE, jobs=None, **kw):
    outcomes = run_vectorized(configs(root, overrides, jobs or grid()), **kw)
    return outcomes


def test_vectorized_equals_separate_runs(separate, tmp_path, caplog):
    sep_root, sep = separate
    with caplog.at_level(logging.INFO, logger="prunelab.vectorized"):
        outcomes = vectorized(tmp_path)
    assert [o.status for o in outcomes] == ["done"] * 6, [(o.status, o.reason, o.error) for o in outcomes]
    vec = [o.results for o in outcomes]
    assert mismatches(sep, vec) == []
    # the vectorised loop (not the normal path) trained and validated every fine-tuning stage
    assert "the normal way" not in caplog.text
    for r in vec:
        rec = json.loads((Path(r["results_file"]).parent / "vectorized.json").read_text())
        assert rec["vectorized"] is True and rec["stages"]["finetune"]["validated_epochs"] == 2, rec
        assert r["stages"]["finetune"]["metrics"]["finetune/val/acc_best"] == r["final"]["val_acc_best"]
    # copies differ from one another (own seed: own data, init and order), and accuracy is not saturated
    assert len({r["final"]["test_loss"] for r in vec}) == 6
    assert all(0.2 < r["final"]["test_acc"] < 1.0 for r in vec), [r["final"]["test_acc"] for r in vec]
    # one dense pretraining per seed, in the same cache folders a separate run uses; trained as one group
    dense = lambda root: sorted(p.name for p in (root / "outputs" / "cache" / "dense").iterdir())  # noqa: E731
    assert dense(tmp_path) == dense(sep_root) and len(dense(tmp_path)) == 3
    rec = json.loads((Path(vec[0]["results_file"]).parent / "vectorized.json").read_text())
    assert rec["stages"]["pretrain"]["copies"] == 3 and rec["stages"]["finetune"]["copies"] == 6


def test_keep_best_restores_each_copys_best_epoch(tmp_path, caplog):
    """``finetune.keep_best=true``: each copy ends with the weights of its own best validation epoch (as the
    stage's ModelCheckpoint keeps them), recorded in the stage's strategy record, equal to its separate run.
    The recipe (3 epochs, lr 0.1) makes the best epoch an earlier one for a copy, so restoring it matters
    (the check fails when the replay skips the keep-best checkpoint: that copy then ends at its last epoch)."""
    overrides = [*BASE, "finetune.keep_best=true", "finetune.epochs=3", "finetune.optimizer.lr=0.1"]
    jobs = [["seed=0", "prune.sparsity=0.5"], ["seed=1", "prune.sparsity=0.9"]]
    sep = [run_pipeline(cfg) for cfg in configs(tmp_path / "separate", overrides, jobs)]
    with caplog.at_level(logging.INFO, logger="prunelab.vectorized"):
        outcomes = vectorized(tmp_path / "vectorized", overrides, jobs)
    assert [o.status for o in outcomes] == ["done"] * 2, [(o.reason, o.error) for o in outcomes]
    assert "the normal way" not in caplog.text
    vec = [o.results for o in outcomes]
    assert mismatches(sep, vec) == []
    best = [r["stages"]["finetune"]["strategy"]["best_epoch"] for r in vec]
    assert min(best) < 2, best  # an earlier epoch than the last is restored for at least one copy
    assert best == [r["stages"]["finetune"]["metrics"]["finetune/val/best_epoch"] for r in vec]


def test_vectorized_rerun_skips_finished_jobs(tmp_path):
    jobs = [["seed=0"], ["seed=1"]]
    first = vectorized(tmp_path, FAST, jobs)
    assert [o.status for o in first] == ["done", "done"]
    again = vectorized(tmp_path, FAST, jobs)
    assert [o.status for o in again] == ["skipped", "skipped"]


@pytest.mark.parametrize("mutation", ["shared_data_order", "no_masks_in_step"])
def test_equivalence_check_detects_mutations(separate, tmp_path, monkeypatch, mutation):
    """The equivalence test can fail: copies sharing copy 0's data order, or a step without the masks."""
    if mutation == "shared_data_order":
        original = vtrain.train_dataset
        first: dict = {}

        def shared(ctx):
            ds, nb = original(ctx)
            return first.setdefault("ds", ds), nb

        monkeypatch.setattr(vtrain, "train_dataset", shared)
    else:
        monkeypatch.setattr(StackedModel, "mask_grads", lambda self: None)
        monkeypatch.setattr(StackedModel, "apply_masks", lambda self: None)
    outcomes = vectorized(tmp_path)
    assert [o.status for o in outcomes] == ["done"] * 6
    bad = mismatches(separate[1], [o.results for o in outcomes])
    assert any("final weight" in b for b in bad), bad


# Recipes beyond SGD + cosine: each as separate runs and as one vectorised group (at_init: scored at init by
# SNIP, trained with the pretraining recipe).
RECIPES = {
    "adamw_step_warmup_clip": ["pretrain.optimizer.name=adamw", "pretrain.optimizer.lr=0.003",
                               "pretrain.optimizer.weight_decay=0.01", "pretrain.scheduler.name=step",
                               "pretrain.scheduler.warmup_epochs=1", "pretrain.optimizer.clip_grad_norm=0.5"],
    "sgd_nesterov_constant_limit": ["pretrain.optimizer.nesterov=true", "pretrain.optimizer.lr=0.05",
                                    "pretrain.scheduler.name=constant", "trainer.limit_train_batches=3"],
    "adam": ["pretrain.optimizer.name=adam", "pretrain.optimizer.lr=0.001", "pretrain.optimizer.weight_decay=1e-4"],
    "lenet5_conv": ["model=lenet5", "pretrain.optimizer.lr=0.02"],  # vmapped convolutions
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_vectorized_recipes_equal_separate_runs(tmp_path, recipe):
    overrides = [*BASE, "schedule=at_init", "method=snip", "allocation=global", *RECIPES[recipe]]
    jobs = [["seed=0", "prune.sparsity=0.8"], ["seed=1", "prune.sparsity=0.6"]]
    sep = [run_pipeline(cfg) for cfg in configs(tmp_path / "separate", overrides, jobs)]
    outcomes = vectorized(tmp_path / "vectorized", overrides, jobs)
    assert [o.status for o in outcomes] == ["done", "done"], [(o.reason, o.error) for o in outcomes]
    vec = [o.results for o in outcomes]
    for a, b in zip(sep, vec):
        assert a["final"]["test_acc"] == b["final"]["test_acc"]
        assert a["final"]["test_loss"] == pytest.approx(b["final"]["test_loss"], rel=1e-4)
        wa, wb = weights(a, "finetune"), weights(b, "finetune")
        for name, t in wa["model"].items():
            assert torch.allclose(t, wb["model"][name], atol=ATOL, rtol=0), name


def test_masks_exact_after_every_step(tmp_path, monkeypatch):
    """Pruned weights are exactly zero after every optimiser step of every copy (AdamW with weight decay;
    checked when the step is complete, at the LR-scheduler step that ends it)."""
    stacked, checked = [], []

    class Spy(StackedModel):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            stacked.append(self)

    def pruned_zero(model: StackedModel) -> bool:
        return all(bool((p.detach()[m == 0] == 0).all()) for p, m in zip(model._masked, model._mask_list))

    original_build = vtrain.build

    def build(params, *a, **k):
        opt, sched = original_build(params, *a, **k)
        step = sched.step

        def checked_step(*args, **kwargs):
            checked.append(pruned_zero(stacked[-1]))
            return step(*args, **kwargs)

        sched.step = checked_step
        return opt, sched

    monkeypatch.setattr(vtrain, "StackedModel", Spy)
    monkeypatch.setattr(vtrain, "build", build)
    overrides = [*BASE, "schedule=at_init", "method=random", *RECIPES["adamw_step_warmup_clip"]]
    outcomes = vectorized(tmp_path, overrides, [["seed=0", "prune.sparsity=0.9"], ["seed=1", "prune.sparsity=0.7"]])
    assert [o.status for o in outcomes] == ["done", "done"]
    assert len(checked) == 2 * 7 and all(checked)  # 2 epochs x 7 batches (230 training samples / 32)
    for o in outcomes:
        state = weights(o.results, "finetune")
        for name, m in state["masks"].items():
            assert bool((state["model"][name][~m] == 0).all())
        assert o.results["final"]["sparsity_direct"] == pytest.approx(o.cfg.prune.sparsity, abs=1e-4)


def test_dense_cache_shared_with_separate_runs(tmp_path):
    """A separate run's dense model is reused by a vectorised sweep in the same folder and the other way
    round: the cache key is the pipeline's own."""
    run_pipeline(configs(tmp_path, SHARED_CACHE, [["seed=0"]])[0])
    outcomes = run_vectorized(configs(tmp_path, SHARED_CACHE, [["seed=0", "prune.sparsity=0.5"], ["seed=1"]]))
    assert [o.status for o in outcomes] == ["done", "done"]
    assert [o.results["stages"]["pretrain"]["cached"] for o in outcomes] == [True, False]
    rec = json.loads((Path(outcomes[1].results["results_file"]).parent / "vectorized.json").read_text())
    assert rec["stages"]["pretrain"]["copies"] == 1  # only seed 1 was pretrained
    later = run_pipeline(configs(tmp_path, SHARED_CACHE, [["seed=1", "prune.sparsity=0.7"]])[0])
    assert later["stages"]["pretrain"]["cached"] is True


def test_out_of_scope_jobs_fall_back(tmp_path):
    outcomes = run_vectorized(configs(tmp_path, FAST, [["schedule=iterative"], ["finetune=overparam"],
                                                       ["method=l2_norm", "schedule=iterative_structured"],
                                                       ["+trainer.check_val_every_n_epoch=2"], ["seed=3"]]))
    assert [o.status for o in outcomes] == ["fallback", "fallback", "fallback", "fallback", "done"]
    assert "schedule=iterative" in outcomes[0].reason and "finetune=overparam" in outcomes[1].reason
    assert "structured" in outcomes[2].reason or "schedule=" in outcomes[2].reason
    assert "check_val_every_n_epoch" in outcomes[3].reason  # the loop validates after every epoch


def test_unsupported_callback_trains_the_normal_way(tmp_path, caplog):
    """A configured Lightning callback the vectorised loop cannot honour: each training stage of the job
    trains the normal way inside its pipeline (and says why); the job still completes, unvectorised."""
    cfgs = configs(tmp_path, [*FAST, "+callbacks.timer._target_=lightning.pytorch.callbacks.Timer"], [["seed=0"]])
    with caplog.at_level(logging.INFO, logger="prunelab.vectorized"):
        outcomes = run_vectorized(cfgs)
    assert [o.status for o in outcomes] == ["done"], [(o.reason, o.error) for o in outcomes]
    for stage in ("pretrain", "finetune"):
        assert f"{stage} of {cfgs[0].paths.output_dir}" in caplog.text
    assert caplog.text.count("trains the normal way: Lightning callbacks are configured") == 2
    assert not (Path(outcomes[0].results["results_file"]).parent / "vectorized.json").exists()
    assert outcomes[0].results["final"]["val_acc_best"] is not None


def test_num_batches_matches_lightning():
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.trainer.connectors.data_connector import _parse_num_batches
    from lightning.pytorch.trainer.states import RunningStage

    for length in (1, 7, 64):
        for limit in (None, 1, 3, 100, 0.5, 0.25, 1.0):
            try:
                expected = _parse_num_batches(RunningStage.TRAINING, length, 1.0 if limit is None else limit)
            except MisconfigurationException:
                expected = "error"
            try:
                got = vtrain.num_batches(length, limit)
            except ValueError:
                got = "error"
            assert got == expected, (length, limit)


@pytest.mark.slow
def test_cli_vectorized_launcher(tmp_path):
    """``prunelab -m experiment=vectorized``: one results.json per job in the usual multirun folders; a job
    outside the scope runs the normal way and says why."""
    out = prunelab(tmp_path, "-m", "experiment=vectorized", *FAST, "logger=csv", "seed=0,1",
                   "schedule=oneshot,iterative", timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    # outputs/multirun/<name>/<sweep id>/<job folder>
    jobs = [p for p in (tmp_path / "outputs" / "multirun" / "default").glob("*/*")
            if p.is_dir() and not p.name.startswith(".")]
    assert len(jobs) == 4 and all((j / "results.json").exists() and (j / ".hydra" / "config.yaml").exists()
                                  for j in jobs)
    vec = [j for j in jobs if (j / "vectorized.json").exists()]
    assert sorted(json.loads((j / "results.json").read_text())["config"]["schedule"]["_target_"].split(".")[-1]
                  for j in vec) == ["OneShot", "OneShot"]
    assert (out.stdout + out.stderr).count("runs the normal way: schedule=iterative") == 2  # said once per job
    out = prunelab(tmp_path, "-m", "experiment=vectorized", *FAST, "logger=csv", "seed=0,1",
                   "schedule=oneshot,iterative", timeout=900)
    assert out.returncode == 0 and (out.stdout + out.stderr).count("already done") >= 4


@pytest.mark.parametrize("data", ["synthetic", "digits"])
def test_epoch_batches_are_the_pipeline_batches(tmp_path, data):
    """Copy k's batch i of epoch e, gathered and processed chunk-wise, equals (bit for bit) its data
    module's batch i of epoch e as the Lightning loop gets it; copies with other seeds get other batches."""
    from prunelab.pipeline.run import build_context

    cfgs = configs(tmp_path, [f"data={data}", "data.batch_size=32", "logger=none"], [["seed=0"], ["seed=5"]])
    reqs = [vtrain.Request(build_context(c), None, 1, "") for c in cfgs]
    data_ = [vtrain.train_dataset(r.ctx) for r in reqs]
    sample = data_[0][0].x[0].numel() * 4
    for epoch in (0, 3):
        # a budget of 7 batches per chunk: chunk boundaries inside the epoch, a short last chunk
        batches = vtrain.EpochBatches(reqs, data_, torch.device("cpu"), epoch, budget_bytes=2 * 32 * sample * 7)
        assert batches.chunked and batches.chunk == 7 and batches.nb % 7 != 0
        for i in range(batches.nb):
            x, y = batches.batch(i)
            for k, r in enumerate(reqs):
                dm = r.ctx.datamodule
                dm.set_epoch(epoch)
                ds = dm.train_dataset()
                ds.epoch_fn = None
                ds.set_epoch(epoch)
                xe, ye = dm.process_batch(*ds[i], train=True)
                assert torch.equal(x[k], xe) and torch.equal(y[k], ye), (epoch, i, k)
        assert not torch.equal(batches.batch(0)[1][0], batches.batch(0)[1][1])


def test_methods_share_one_group_and_equal_separate_runs(tmp_path):
    """Jobs that differ only in what decides the masks (method, its options, sparsity) fine-tune as one
    stacked model; each copy still equals its separate run."""
    jobs = [["method=lamp"], ["method=grasp", "prune.sparsity=0.7"], ["method=synflow", "method.rounds=5"],
            ["method=random", "allocation=erk"]]
    overrides = SHARED_CACHE  # one dense pretraining in the shared cache, reused by the other three jobs
    sep = [run_pipeline(cfg) for cfg in configs(tmp_path / "separate", overrides, jobs)]
    outcomes = run_vectorized(configs(tmp_path / "vectorized", overrides, jobs))
    assert [o.status for o in outcomes] == ["done"] * 4, [(o.reason, o.error) for o in outcomes]
    vec = [o.results for o in outcomes]
    for a, b in zip(sep, vec):
        wa, wb = weights(a, "finetune"), weights(b, "finetune")
        assert all(torch.equal(wa["masks"][n], wb["masks"][n]) for n in wa["masks"])
        assert all(torch.allclose(t, wb["model"][n], atol=ATOL, rtol=0) for n, t in wa["model"].items())
        assert a["final"]["test_acc"] == b["final"]["test_acc"]
    recs = [json.loads((Path(r["results_file"]).parent / "vectorized.json").read_text()) for r in vec]
    assert [r["stages"]["finetune"]["copies"] for r in recs] == [4] * 4
    assert [r["stages"]["pretrain"]["copies"] for r in recs[:1]] == [1] and all("pretrain" not in r["stages"]
                                                                               for r in recs[1:])
