"""The dense-model cache: its key covers everything that changes the dense weights, debug runs keep their own
dense model, a folder recording another key is refused, a read-only cache is read; and the files the cache and
the run folders hold are safe to share (umask, stale temporary files, unique write probes, a run-folder lock)."""

from __future__ import annotations

import json
import multiprocessing
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from prunelab.pipeline.cache import DenseCacheMismatch, RunDirBusy, debug_mode, dense_identity, dense_key
from prunelab.pipeline.run import run_pipeline
from prunelab.utils import io
from tests.conftest import FULL
from tests.helpers import load_script

SHARED = ("outputs", "cache", "dense")


def _key(make_cfg, *overrides: str) -> str:
    return dense_key(dense_identity(make_cfg(*FULL, *overrides, fast=False)))


# What changes the dense weights changes the key; the single-line bug "the key ignores the model" fails here.
@pytest.mark.parametrize("override", [
    "model=mlp", "model=lenet5", "+model.weights=w.pt", "data.input_shape=[1,16,16]", "data.num_train=96", "data.val_fraction=0.2",
    "data.augment=true", "data.batch_size=16", "data.signal=0.5", "seed=1", "pretrain.epochs=2",
    "pretrain.optimizer.lr=0.05", "pretrain.scheduler.name=step", "trainer.precision=bf16-mixed",
    "+trainer.accumulate_grad_batches=2", "trainer=ddp_cpu", "trainer.devices=2", "trainer.num_nodes=2",
    "+trainer.sync_batchnorm=true", "trainer.deterministic=true", "+trainer.benchmark=true",
    "trainer.limit_train_batches=1", "+trainer.overfit_batches=2", "+trainer.max_steps=3",
])
def test_dense_key_covers_what_changes_the_weights(make_cfg, override):
    assert _key(make_cfg, override) != _key(make_cfg)


@pytest.mark.parametrize("override", [
    "prune.sparsity=0.5", "method=random", "finetune.epochs=3", "schedule=iterative", "allocation=uniform",
    "trainer.enable_progress_bar=true", "trainer.log_every_n_steps=1", "logger=csv", "data.num_workers=2",
    "measure.latency=false", "name=other", "trainer.devices=[0]",
])
def test_dense_key_ignores_what_does_not(make_cfg, override):
    assert _key(make_cfg, override) == _key(make_cfg)


def _dense_state(res: dict) -> dict[str, torch.Tensor]:
    return torch.load(Path(res["stages"]["pretrain"]["dir"]) / "model.pt", weights_only=True)


def _write_npz(path: Path, seed: int) -> None:
    g = np.random.default_rng(seed)
    np.savez(path, x=g.normal(size=(100, 1, 28, 28)).astype(np.float32), y=np.arange(100) % 10)


def test_two_models_and_two_datasets_get_their_own_dense_models(make_cfg, tmp_path):
    npz = tmp_path / "d.npz"
    _write_npz(npz, 0)
    syn = FULL
    npz_opts = [o for o in FULL if not o.startswith("data")] + ["data=npz", f"data.path={npz}", "data.batch_size=32"]
    runs = {}
    for name, over in {"lenet_syn": syn, "mlp_syn": [*syn, "model=mlp"], "lenet_npz": npz_opts,
                       "mlp_npz": [*npz_opts, "model=mlp"]}.items():
        runs[name] = run_pipeline(make_cfg(*over, "finetune.epochs=0", fast=False, output_dir=tmp_path / name))
        assert runs[name]["stages"]["pretrain"]["cached"] is False, name
        assert runs[name]["debug"] is None
    dirs = {r["stages"]["pretrain"]["dir"] for r in runs.values()}
    assert len(dirs) == 4 and all(Path(d).parent == tmp_path.joinpath(*SHARED) for d in dirs)
    # same data and model: the second model of one dataset is not the first one's
    syn_state, npz_state = _dense_state(runs["lenet_syn"]), _dense_state(runs["lenet_npz"])
    assert any(not torch.equal(v, npz_state[k]) for k, v in syn_state.items())
    # another sparsity shares the dense model
    again = run_pipeline(make_cfg(*FULL, "finetune.epochs=0", "prune.sparsity=0.5", fast=False,
                                  output_dir=tmp_path / "again"))
    assert again["stages"]["pretrain"]["cached"] is True
    assert again["stages"]["pretrain"]["dir"] == runs["lenet_syn"]["stages"]["pretrain"]["dir"]
    # the npz file replaced by other data under the same path: another dense model
    _write_npz(npz, 1)
    other = run_pipeline(make_cfg(*npz_opts, "finetune.epochs=0", fast=False, output_dir=tmp_path / "new"))
    assert other["stages"]["pretrain"]["cached"] is False


def test_debug_limited_run_then_full_run_retrains(make_cfg, tmp_path):
    limited = run_pipeline(make_cfg(*FULL, "trainer.limit_train_batches=1", "finetune.epochs=0", fast=False,
                                    output_dir=tmp_path / "limited"))
    assert limited["debug"] == "trainer.limit_train_batches=1"
    assert Path(limited["stages"]["pretrain"]["dir"]).is_relative_to(tmp_path / "limited" / "cache")
    assert not tmp_path.joinpath(*SHARED).exists()  # the shared cache is never written by a debug run
    full = run_pipeline(make_cfg(*FULL, "finetune.epochs=0", fast=False, output_dir=tmp_path / "full"))
    assert full["stages"]["pretrain"]["cached"] is False and full["debug"] is None
    assert Path(full["stages"]["pretrain"]["dir"]).parent == tmp_path.joinpath(*SHARED)
    # ... nor read: a debug run does not pick up a full run's dense model
    again = run_pipeline(make_cfg(*FULL, "debug=limit", "finetune.epochs=0", fast=False,
                                  output_dir=tmp_path / "again"))
    assert again["stages"]["pretrain"]["cached"] is False and again["debug"] == "limit"


@pytest.mark.parametrize("option, trainer_key", [("fdr", "fast_dev_run"), ("limit", "limit_train_batches"),
                                                 ("overfit", "overfit_batches"), ("profiler", "profiler")])
def test_debug_group(make_cfg, tmp_path, option, trainer_key):
    cfg = make_cfg(*FULL, f"debug={option}", fast=False)
    assert cfg.trainer[trainer_key] and cfg.name == "debug" and debug_mode(cfg) == option
    res = run_pipeline(cfg)
    assert json.loads(Path(res["results_file"]).read_text())["debug"] == option
    assert Path(res["stages"]["pretrain"]["dir"]).is_relative_to(tmp_path / "run" / "cache")
    assert not tmp_path.joinpath(*SHARED).exists()


def test_cache_folder_recording_another_key_is_refused(make_cfg, tmp_path):
    first = run_pipeline(make_cfg(*FULL, "finetune.epochs=0", fast=False, output_dir=tmp_path / "a"))
    entry = Path(first["stages"]["pretrain"]["dir"])
    key = json.loads((entry / "key.json").read_text())
    assert key["key"] == entry.name and key["identity"]["model"]["name"] == "lenet_300_100"
    key["identity"]["seed"] = 123  # e.g. a folder copied in from another configuration
    (entry / "key.json").write_text(json.dumps(key))
    with pytest.raises(DenseCacheMismatch, match=f"{entry}.*seed: cached 123, this run 0"):
        run_pipeline(make_cfg(*FULL, "finetune.epochs=0", fast=False, output_dir=tmp_path / "b"))


def test_read_only_complete_cache_is_read(make_cfg):
    # A cache made read-only with chmod; as root (which ignores permissions) the second run is started without
    # the capabilities that override them.
    as_root = os.geteuid() == 0
    if as_root and shutil.which("capsh") is None:
        pytest.skip("running as root without capsh: cannot make a directory read-only for this user")
    root = Path(tempfile.mkdtemp(prefix="prunelab-ro-"))
    try:
        root.chmod(0o777)
        cache = root / "cache"
        run_pipeline(make_cfg(*FULL, "finetune.epochs=0", f"paths.cache_dir={cache}", fast=False,
                              output_dir=root / "first"))
        for p in [cache, *cache.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        work = root / "work"
        work.mkdir(mode=0o777)
        work.chmod(0o777)
        env = dict(os.environ, HOME=str(work), WANDB_MODE="offline", PYTHONWARNINGS="ignore")

        def run(*args: str) -> subprocess.CompletedProcess:
            cmd = [sys.executable, "-m", "prunelab.cli", *FULL, "finetune.epochs=0", f"paths.cache_dir={cache}", *args]
            if as_root:
                cmd = ["capsh", "--drop=cap_dac_override,cap_dac_read_search,cap_fowner", "--", "-c", shlex.join(cmd)]
            return subprocess.run(cmd, cwd=work, env=env, text=True, capture_output=True, timeout=600)

        out = run("prune.sparsity=0.5")
        assert out.returncode == 0, out.stderr[-3000:]
        (res,) = [json.loads(f.read_text()) for f in work.glob("outputs/runs/**/results.json")]
        assert res["stages"]["pretrain"]["cached"] is True
        out = run("seed=5")  # no dense model for this key, and the cache cannot take one
        assert out.returncode != 0
        assert "paths.cache_dir" in out.stderr and "read-only" in out.stderr
    finally:
        for p in [root, *root.rglob("*")]:
            if not p.is_symlink():
                p.chmod(0o777 if p.is_dir() else 0o666)
        shutil.rmtree(root, ignore_errors=True)


# files shared between processes ------------------------------------------------------------------------------
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        io.atomic_write_json({"a": 1}, tmp_path / "r.json")
        io.atomic_torch_save({"w": torch.zeros(2)}, tmp_path / "m.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == mode
    assert (tmp_path / "m.pt").stat().st_mode & 0o777 == mode


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporary_files_are_removed(tmp_path):
    host = socket.gethostname()
    old = time.time() - 2 * io.STALE_TMP_AGE_S
    files = {
        "dead_old": f".model.pt.{_dead_pid()}@{host}.abc123.tmp",   # killed writer, a while ago: removed
        "dead_new": f".model.pt.{_dead_pid()}@{host}.abc124.tmp",   # killed just now: maybe another pid namespace
        "live_old": f".model.pt.{os.getpid()}@{host}.abc125.tmp",   # a live (slow) writer: never touched
        "foreign_old": ".model.pt.1@other-node.abc126.tmp",          # another host's, long untouched: removed
        "foreign_new": ".model.pt.1@other-node.abc127.tmp",          # another host's, being written
        "legacy_old": ".results.json.k2j3h4.tmp",                    # before pid@host names
        "not_tmp": "model.pt",
    }
    for key, name in files.items():
        p = tmp_path / "stages" / name
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"partial")
        if key.endswith("_old"):
            os.utime(p, (old, old))
    removed = {p.name for p in io.clean_stale_tmp(tmp_path)}
    assert removed == {files[k] for k in ("dead_old", "foreign_old", "legacy_old")}
    assert sorted(p.name for p in (tmp_path / "stages").iterdir()) == sorted(
        files[k] for k in ("dead_new", "live_old", "foreign_new", "not_tmp"))


def test_a_run_cleans_stale_temporary_files_of_its_folder(make_cfg, tmp_path):
    stale = tmp_path / "run" / "stages" / f".finetune.pt.{_dead_pid()}@{socket.gethostname()}.x1y2z3.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a checkpoint")
    os.utime(stale, (time.time() - 600, time.time() - 600))
    run_pipeline(make_cfg("finetune.epochs=0"))
    assert not stale.exists()
    assert not list((tmp_path / "run").rglob(".*.tmp"))  # and the run's own writes left none


def _probe_many(args) -> int:
    directory, n = args
    failures = 0
    for _ in range(n):
        try:
            io.check_writable(directory, "paths.output_dir")
        except PermissionError:
            failures += 1
    return failures


def test_concurrent_write_probes_do_not_collide(tmp_path):
    with multiprocessing.get_context("fork").Pool(4) as pool:
        failures = pool.map(_probe_many, [(str(tmp_path), 500)] * 4)
    assert sum(failures) == 0
    assert list(tmp_path.iterdir()) == []


HOLDER = """
import sys
from pathlib import Path
from prunelab.pipeline.cache import hold_run_dir
hold_run_dir(Path(sys.argv[1]))
print("held", flush=True)
sys.stdin.read()
"""


def test_second_process_on_a_run_folder_is_refused(make_cfg, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusy, match=rf"paths.output_dir={run_dir} is in use .*pid {holder.pid}"):
            run_pipeline(make_cfg("finetune.epochs=0"))
        assert not (run_dir / "run.json").exists()  # refused before claiming anything
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    res = run_pipeline(make_cfg("finetune.epochs=0"))  # the holder is gone: the folder is free
    assert res["final"]["test_acc"] is not None
    lock = io.try_lock(run_dir / ".prunelab.lock")  # and released at the end of the run
    assert lock is not None
    lock.release()


def test_oracle_script_finds_the_dense_model_the_pipeline_cached(make_cfg, tmp_path):
    """scripts/oracle_correlation_fmnist.py reads the cached dense models: its lookup (through the same
    identity as the pipeline, data fingerprint included) finds the file the pipeline wrote."""
    from hydra.utils import instantiate

    npz = tmp_path / "d.npz"
    _write_npz(npz, 0)
    opts = [o for o in FULL if not o.startswith("data")] + ["data=npz", f"data.path={npz}", "data.batch_size=32",
                                                             "finetune.epochs=0"]
    cfg = make_cfg(*opts, fast=False, output_dir=tmp_path / "run")
    res = run_pipeline(cfg)
    script = load_script("oracle_correlation_fmnist")
    dm = instantiate(cfg.data)
    found = script.dense_model_file(cfg.paths.cache_dir, cfg, dm)
    assert found == Path(res["stages"]["pretrain"]["dir"]) / "model.pt" and found.is_file()
    _write_npz(npz, 1)  # other data: another dense model
    assert script.dense_model_file(cfg.paths.cache_dir, cfg, instantiate(cfg.data)) != found
