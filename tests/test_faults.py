"""Faults: non-finite training, data or models stop a run with a message naming what to change (nothing is
recorded or cached), and damaged artefacts (truncated, garbled, emptied) are recomputed: records are ignored with
a warning naming the file, torch files are moved aside and never loaded; never a raw JSONDecodeError,
UnpicklingError or EOFError."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from prunelab.pipeline.cache import release_run_dirs
from prunelab.pipeline.run import build_context, run_pipeline
from prunelab.utils.finite import NonFiniteError
from tests.conftest import FULL, compose_config
from tests.test_cli import prunelab

NO_DATA = [o for o in FULL if not o.startswith("data")]


# non-finite training, data and models ------------------------------------------------------------------------
@pytest.mark.parametrize("override, options", [
    ("pretrain.optimizer.lr=1e6", "pretrain.optimizer"),
    ("finetune.optimizer.lr=1e6", "finetune.optimizer"),
])
def test_diverging_stage_stops_and_records_nothing(make_cfg, tmp_path, override, options):
    cfg = make_cfg(*FULL, override, "pretrain.epochs=3", "finetune.epochs=3", fast=False)
    # the loss check stops the stage (not only the model check before its record)
    with pytest.raises(NonFiniteError, match=rf"training loss became non-finite.*Lower {options}\.lr .*"
                                             rf"{options}\.clip_grad_norm"):
        run_pipeline(cfg)
    stage = options.split(".")[0]
    assert not list(tmp_path.rglob(f"{stage}.json"))  # no stage record
    if stage == "pretrain":
        assert not list(tmp_path.rglob("model.pt")) and not list(tmp_path.rglob("metrics.json"))  # nothing cached
    assert not (tmp_path / "run" / "results.json").exists()


def test_diverging_run_exits_non_zero(tmp_path):
    out = prunelab(tmp_path, *FULL, "pretrain.optimizer.lr=1e6", "pretrain.epochs=3", "finetune.epochs=0")
    assert out.returncode != 0
    assert "pretrain.optimizer.lr" in out.stderr and "non-finite" in out.stderr
    assert not list(tmp_path.rglob("model.pt"))


def test_nan_learning_rate_is_refused_before_training(tmp_path):
    out = prunelab(tmp_path, *FULL, "pretrain.optimizer.lr=nan", "finetune.epochs=0")
    assert out.returncode == 2 and "pretrain.optimizer.lr=nan" in out.stderr
    assert not list(tmp_path.rglob("model.pt"))


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_npz_with_a_non_finite_pixel_is_refused(make_cfg, tmp_path, value):
    x = np.random.default_rng(0).normal(size=(60, 1, 8, 8)).astype(np.float32)
    x[7, 0, 3, 3] = value
    path = tmp_path / "bad.npz"
    np.savez(path, x=x, y=np.arange(60) % 3)
    with pytest.raises(ValueError, match=rf"{path}: array 'x' holds 1 non-finite values"):
        run_pipeline(make_cfg(*NO_DATA, "data=npz", f"data.path={path}", fast=False))
    assert not list(tmp_path.rglob("dense"))


@pytest.mark.parametrize("content", [b"", b"not an archive at all", b"PK\x03\x04truncated"])
def test_npz_that_is_not_an_archive_is_named(make_cfg, tmp_path, content):
    path = tmp_path / "bad.npz"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"data.path={path}: {path} is not a .npz archive"):
        run_pipeline(make_cfg(*NO_DATA, "data=npz", f"data.path={path}", fast=False))


def test_generated_data_with_non_finite_values_is_refused(make_cfg, tmp_path):
    # refused by the option check (data.noise) before the data module's own non-finite check is reached
    with pytest.raises(ValueError, match=r"data\.noise=nan"):
        run_pipeline(make_cfg("data.noise=nan"))
    assert not list(tmp_path.rglob("dense"))


@pytest.mark.parametrize("override, match", [("data.std=[0.0]", r"data.std=\[0.0\]: must be finite and > 0"),
                                             ("data.mean=[nan]", r"data\.mean=\[nan\]")])
def test_non_finite_normalisation_is_refused(make_cfg, tmp_path, override, match):
    path = tmp_path / "ok.npz"
    np.savez(path, x=np.zeros((40, 1, 8, 8), np.float32), y=np.arange(40) % 2)
    with pytest.raises(ValueError, match=match):
        run_pipeline(make_cfg(*NO_DATA, "data=npz", f"data.path={path}", override, fast=False))


def test_no_sparsity_from_nan_weights_and_no_nan_stage_record(make_cfg):
    ctx = build_context(make_cfg())
    release_run_dirs()
    model = ctx.build_model()
    masks = ctx.new_masks(model)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="prune: the model holds non-finite values"):
        ctx.sparsity_metrics(model, masks, "prune")  # would report "layer collapse"
    with pytest.raises(NonFiniteError, match="finetune: the trained model holds non-finite"):
        ctx.save_stage("finetune", {"metrics": {}}, model, masks)
    assert "finetune" not in ctx.stages and not ctx.stage_path("finetune", "json").exists()
    entry = ctx.dense_entry()
    with pytest.raises(NonFiniteError, match="pretrain: the trained dense model holds non-finite"):
        entry.finish(model, {"metrics": {"pretrain/test/acc": 0.1}, "epochs": 1}, "advice")
    assert not entry.model_file.exists() and not entry.record_file.exists()


# damaged artefacts -------------------------------------------------------------------------------------------
def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbled":
        rng = np.random.default_rng(0)
        mid = len(data) // 3
        path.write_bytes(data[:mid] + rng.integers(0, 256, size=max(64, len(data) // 3), dtype=np.uint8).tobytes())
    elif how == "flipped":  # one byte inside the data, same size: torch.load would read wrong weights silently
        mid = len(data) // 2
        path.write_bytes(data[:mid] + bytes([data[mid] ^ 0x5A]) + data[mid + 1:])
    elif how == "emptied":
        path.write_bytes(b"")
    elif how == "empty_object":
        path.write_text("{}")
    else:
        raise ValueError(how)


def _entry(root: Path) -> Path:
    (entry,) = (root / "outputs" / "cache" / "dense").iterdir()
    return entry


ARTEFACTS = {  # kind -> (file, is a torch file)
    "results.json": (lambda r: r / "run" / "results.json", False),
    "run.json": (lambda r: r / "run" / "run.json", False),
    "prune.json": (lambda r: r / "run" / "stages" / "prune.json", False),
    "finetune.json": (lambda r: r / "run" / "stages" / "finetune.json", False),
    "cache metrics.json": (lambda r: _entry(r) / "metrics.json", False),
    "cache key.json": (lambda r: _entry(r) / "key.json", False),
    "prune.pt": (lambda r: r / "run" / "stages" / "prune.pt", True),
    "finetune.pt": (lambda r: r / "run" / "stages" / "finetune.pt", True),
    "cache model.pt": (lambda r: _entry(r) / "model.pt", True),
    "cache init.pt": (lambda r: _entry(r) / "init.pt", True),
}
CASES = [(kind, how) for kind, (_, is_torch) in ARTEFACTS.items()
         for how in ("truncated", "garbled", "emptied") + (("flipped",) if is_torch else ("empty_object",))]


def _cfg(root: Path, *extra: str):
    return compose_config(root, [*FULL, *extra], root / "run")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished full run (shared dense cache) and its results: copied, damaged and re-run by each case."""
    root = tmp_path_factory.mktemp("finished")
    results = run_pipeline(_cfg(root))
    return root, results


@pytest.mark.slow
@pytest.mark.parametrize("kind, how", CASES)
def test_damaged_artefact_is_recomputed(finished, tmp_path, caplog, kind, how):
    pristine, reference = finished
    root = tmp_path / "copy"
    shutil.copytree(pristine, root)
    file_of, is_torch = ARTEFACTS[kind]
    path = file_of(root)
    _damage(path, how)
    if kind not in ("results.json", "run.json"):
        # a stage or cache file matters when the run is not finished (or another run shares the cache)
        (root / "run" / "results.json").unlink()
    with caplog.at_level(logging.WARNING):
        res = run_pipeline(_cfg(root))
    assert "skipped" not in res
    assert res["final"] == reference["final"]  # recomputed, and correctly
    stored = json.loads((root / "run" / "results.json").read_text())
    assert stored["final"] == reference["final"]
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert path.name in warned, warned
    if is_torch:  # moved aside, never loaded; a fresh one in its place
        assert [p.name.split(".damaged-")[0] for p in path.parent.glob(f"{path.name}.damaged-*")] == [path.name]
        torch.load(path, weights_only=False)
    else:
        assert json.loads(path.read_text())  # rewritten
    if kind.startswith("cache"):
        assert res["stages"]["pretrain"]["cached"] is False  # retrained under the same key


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncated", "garbled", "emptied", "flipped"])
def test_damaged_epoch_checkpoint_restarts_the_stage(tmp_path, caplog, how):
    reference = run_pipeline(_cfg(tmp_path / "ref", "finetune.epochs=3"))
    root = tmp_path / "int"
    interrupt = ["+callbacks.interrupt._target_=tests.helpers.Interrupt", "+callbacks.interrupt.epoch=2"]
    with pytest.raises(RuntimeError, match="simulated pre-emption"):
        run_pipeline(_cfg(root, "finetune.epochs=3", *interrupt))
    last = root / "run" / "checkpoints" / "finetune" / "last.ckpt"
    _damage(last, how)
    with caplog.at_level(logging.WARNING):
        res = run_pipeline(_cfg(root, "finetune.epochs=3"))
    assert res["final"] == reference["final"]  # the stage started over: the same as an uninterrupted run
    assert "last.ckpt is damaged" in " ".join(r.getMessage() for r in caplog.records)
    assert not last.parent.exists()  # finished stage: its checkpoints (the damaged one too) cleaned up


def test_valid_but_empty_records_never_stand_in(finished, tmp_path):
    # issue 16: a stages/finetune.json of {} made final.test_acc silently the prune stage's
    pristine, reference = finished
    root = tmp_path / "copy"
    shutil.copytree(pristine, root)
    for name in ("finetune.json", "prune.json"):
        (root / "run" / "stages" / name).write_text("{}")
    (root / "run" / "results.json").unlink()
    res = run_pipeline(_cfg(root))
    assert res["final"]["test_acc"] == reference["final"]["test_acc"] is not None
    assert res["stages"]["finetune"]["metrics"]["finetune/test/acc"] == res["final"]["test_acc"]
    assert os.path.getsize(root / "run" / "stages" / "finetune.json") > 2
