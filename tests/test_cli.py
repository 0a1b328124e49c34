"""The ``prunelab`` command as a user runs it: help and version, printed config, a run and its log, the
pruning target on the command line, run folders that a refused command leaves alone, Ctrl-C, W&B offline,
DDP on CPU."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest

from prunelab.utils.wandb_offline import read_offline_run

ROOT = Path(__file__).resolve().parent.parent

FAST = ["data=synthetic", "data.num_train=256", "data.num_test=64", "data.batch_size=32", "pretrain.epochs=1",
        "finetune.epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false"]


def cli_env() -> dict[str, str]:
    # the repository first on the path: the CLI imports this checkout (and tests.* callbacks)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONWARNINGS="ignore", PYTHONPATH=path)


def prunelab(cwd: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prunelab.cli", *args], cwd=cwd, env=cli_env(), text=True,
                          capture_output=True, timeout=timeout)


def results_files(root: Path) -> list[Path]:
    return sorted(root.glob("outputs/**/results.json"))


def test_help_lists_groups(tmp_path):
    out = prunelab(tmp_path, "--help")
    assert out.returncode == 0, out.stderr
    for group in ("data", "model", "method", "allocation", "schedule", "finetune", "trainer", "logger"):
        assert f"{group}:" in out.stdout
    assert "lenet_300_100" in out.stdout and "magnitude" in out.stdout


def test_help_header_and_every_top_level_key(tmp_path):
    from prunelab.cli import CONFIG_DIR
    from prunelab.config import KEY_HELP, PrunelabConfig

    out = prunelab(tmp_path, "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("prunelab: pruning research"), out.stdout[:200]
    assert "cli" not in out.stdout.splitlines()[0]
    keys = out.stdout.split("== Top-level keys", 1)[1]
    for f in dataclasses.fields(PrunelabConfig):
        # every top-level key is a config group or has a one-line description (a new key needs one)
        assert f.name in KEY_HELP or (Path(CONFIG_DIR) / f.name).is_dir(), f"describe {f.name} in KEY_HELP"
        assert f" {f.name} " in keys.replace("\n", " "), f.name
        if f.name in KEY_HELP:
            assert " ".join(KEY_HELP[f.name].split()[:4]) in " ".join(keys.split())


def test_version_is_prunelabs(tmp_path):
    from prunelab import __version__

    out = prunelab(tmp_path, "--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"prunelab {__version__} ")


def test_cfg_job_prints_config(tmp_path):
    out = prunelab(tmp_path, "--cfg", "job", "prune.sparsity=0.5")
    assert out.returncode == 0, out.stderr
    assert "sparsity: 0.5" in out.stdout and "_target_: prunelab.data.DigitsDataModule" in out.stdout


def test_run_then_rerun_resumes_in_same_folder(tmp_path):
    out = prunelab(tmp_path, *FAST, "logger=csv")
    assert out.returncode == 0, out.stderr
    files = results_files(tmp_path)
    assert len(files) == 1 and "runs/default/" in str(files[0])
    res = json.loads(files[0].read_text())
    assert res["final"]["sparsity_direct"] == pytest.approx(0.9, abs=1e-3)
    assert (files[0].parent / "csv" / "metrics.csv").exists()
    # the log file: a banner per stage, each stage's result, the final metrics
    log = (files[0].parent / "prunelab.log").read_text()
    for line in ("== pretrain: dense model", "pretrain done: test acc", "== prune: method=magnitude to sparsity 0.9",
                 "prune done: test acc", "== finetune: 1 epoch, recipe finetune", "finetune done: test acc",
                 "final metrics", "  test_acc: ", "  sparsity_direct: 0.9"):
        assert line in log, (line, log)
    assert out.stdout.count("prunelab: final") == 1
    assert "log_every_n_steps" not in out.stderr + out.stdout  # known-harmless warnings are silenced
    first = files[0].stat().st_mtime_ns
    out = prunelab(tmp_path, *FAST, "logger=csv")  # same config -> same folder, stages loaded
    assert out.returncode == 0, out.stderr
    assert results_files(tmp_path) == files and files[0].stat().st_mtime_ns >= first
    assert "already done" in out.stderr + out.stdout


def test_bad_option_message(tmp_path):
    out = prunelab(tmp_path, *FAST, "prune.sparsity=1.5")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("prunelab: error: prune.sparsity must be in [0, 1)")
    out = prunelab(tmp_path, "method=nope")
    assert out.returncode == 2 and "Available options" in out.stderr


def test_compression_on_the_command_line(tmp_path):
    # The README's commands set prune.compression alone; the folder is named by the same hash run.json holds
    out = prunelab(tmp_path, *FAST, "prune.compression=100")
    assert out.returncode == 0, out.stderr[-3000:]
    (res_file,) = results_files(tmp_path)
    res = json.loads(res_file.read_text())
    assert res["final"]["sparsity_target"] == pytest.approx(0.99)
    assert res["config"]["prune"]["compression"] == 100 and res["config"]["prune"]["sparsity"] is None
    assert json.loads((res_file.parent / "run.json").read_text())["run_id"] == res_file.parent.name


@pytest.mark.parametrize("overrides", [
    ["schedule=at_init", "method=snip", "prune.compression=100"],  # README: snip at init, 100x
    ["method=random", "allocation=igq", "prune.target=effective", "prune.compression=100"],
])
def test_readme_compression_commands_run(make_cfg, overrides):
    from rich.console import Console

    from prunelab.pipeline.run import run_pipeline
    from prunelab.report.summary import print_summary

    console = Console(record=True, width=200)
    res = run_pipeline(make_cfg(*overrides))
    assert res["final"]["sparsity_target"] == pytest.approx(0.99)
    if "schedule=at_init" in overrides:
        assert res["final"]["compression_direct"] == pytest.approx(100, rel=0.01)
        print_summary(res, console)
        table = console.export_text()
        assert "recipe" in table and "│ pretrain" in table
        # the training stage of at_init uses the pretraining recipe, and says so
        assert res["stages"]["finetune"]["recipe"] == "pretrain" and "pretrain" not in res["stages"]
    else:
        assert res["final"]["target"] == "effective"


def test_resolve_prune_target():
    from prunelab.config import DEFAULT_SPARSITY, resolve_prune_target

    assert resolve_prune_target(None, None) == (DEFAULT_SPARSITY, None)
    assert resolve_prune_target(None, 10) == (None, 10)
    # an overlay's sparsity and a command-line compression: the command line wins, and the other way round
    assert resolve_prune_target(0.5, 10, {"prune.compression"}) == (None, 10)
    assert resolve_prune_target(0.5, 10, {"prune.sparsity"}) == (0.5, None)
    # both on the command line, or both in config files: kept, and refused by the checks
    assert resolve_prune_target(0.5, 10, {"prune.sparsity", "prune.compression"}) == (0.5, 10)
    assert resolve_prune_target(0.5, 10, set()) == (0.5, 10)


def test_at_init_warns_about_the_recipe_it_ignores(make_cfg, caplog, tmp_path):
    from prunelab.pipeline.run import build_context

    with caplog.at_level("WARNING"):  # FAST sets finetune.epochs and pretrain.epochs on the command line
        build_context(make_cfg("schedule=at_init", "finetune.optimizer.lr=0.5"))
    assert "schedule=at_init ignores finetune.epochs, finetune.optimizer.lr" in caplog.text
    assert "schedule.train_from=finetune" in caplog.text and "ignores pretrain" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        build_context(make_cfg("schedule=at_init", "schedule.train_from=finetune", output_dir=tmp_path / "run2"))
    assert "finetune" not in caplog.text.split("ignores")[1] and "ignores pretrain.epochs" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        build_context(make_cfg(output_dir=tmp_path / "run3"))  # oneshot reads both recipes
    assert "ignores" not in caplog.text


def _hydra_record(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / ".hydra").iterdir())}


def test_refused_command_leaves_a_finished_run_folder_alone(tmp_path):
    run_dir = tmp_path / "finished"
    out = prunelab(tmp_path, *FAST, f"hydra.run.dir={run_dir}")
    assert out.returncode == 0, out.stderr[-3000:]
    record = _hydra_record(run_dir)
    assert set(record) == {"config.yaml", "hydra.yaml", "overrides.yaml"}
    results = (run_dir / "results.json").read_bytes()
    for bad in (["seed=1"], ["data.batch_size=0"]):  # another configuration; an invalid value
        out = prunelab(tmp_path, *FAST, *bad, f"hydra.run.dir={run_dir}")
        assert out.returncode == 2, out.stderr[-3000:]
        assert _hydra_record(run_dir) == record  # the finished run's record of how it was made
        assert (run_dir / "results.json").read_bytes() == results
        assert not list(run_dir.glob(".hydra_pending*"))
    assert "holds a run of another configuration" in prunelab(tmp_path, *FAST, "seed=1",
                                                               f"hydra.run.dir={run_dir}").stderr


def test_failed_start_up_checks_claim_nothing(tmp_path):
    run_dir = tmp_path / "run"
    out = prunelab(tmp_path, *FAST, "prune.exclude=[nomatch*]", f"hydra.run.dir={run_dir}")
    assert out.returncode == 2
    assert not (run_dir / "run.json").exists()  # the folder is not claimed by the refused command
    assert "prune.exclude" in (run_dir / "prunelab.log").read_text()  # its log says why
    out = prunelab(tmp_path, *FAST, f"hydra.run.dir={run_dir}")  # the corrected command, same folder
    assert out.returncode == 0, out.stderr[-3000:]
    assert (run_dir / "results.json").exists()


class SigintAt(pl.Callback):
    """Ctrl-C (a real SIGINT to this process) when ``stage`` starts its epoch ``epoch``."""

    def __init__(self, stage: str = "finetune", epoch: int = 1):
        self.stage, self.epoch = stage, epoch

    def on_train_epoch_start(self, trainer, module):
        if module.stage == self.stage and trainer.current_epoch == self.epoch:
            # what the process does with SIGINT, on stderr: a failure of the test below shows it
            print(f"SigintAt: handler {signal.getsignal(signal.SIGINT)!r}, blocked "
                  f"{sorted(signal.pthread_sigmask(signal.SIG_BLOCK, []))}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGINT)


# The CLI with SIGINT as in a terminal's foreground job. A child inherits an ignored or blocked SIGINT from its
# parent (a shell's background job is started so, and Python then leaves SIGINT alone, as prunelab does); the
# pytest worker that starts the CLI may hold either state, left by a library it ran in-process.
FOREGROUND_CLI = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                  "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}); "
                  "runpy.run_module('prunelab.cli', run_name='__main__', alter_sys=True)")


def test_ctrl_c_says_how_to_resume_and_keeps_the_log_rows(tmp_path):
    args = [*FAST, "finetune.epochs=3", "logger=csv"]
    out = subprocess.run([sys.executable, "-c", FOREGROUND_CLI, *args,
                          "+callbacks.sigint._target_=tests.test_cli.SigintAt"], cwd=tmp_path, env=cli_env(),
                         text=True, capture_output=True, timeout=300)
    assert out.returncode == 130, out.stderr[-3000:]
    assert "prunelab: interrupted: stage finetune of " in out.stderr
    assert f"cd {tmp_path} && prunelab " in out.stderr and "finetune.epochs=3" in out.stderr
    assert "Traceback" not in out.stderr
    (csv_file,) = tmp_path.glob("outputs/runs/**/csv/metrics.csv")
    before = csv_file.read_text().splitlines()
    assert "finetune/train/loss" in before[0] and len(before) > 2  # the interrupted stage's rows
    out = prunelab(tmp_path, *args)  # the resume command (callbacks are not part of the run's identity)
    assert out.returncode == 0, out.stderr[-3000:]
    after = csv_file.read_text().splitlines()
    assert len(after) > len(before)
    # every earlier row is still there (the header may have gained columns: compare the non-empty values)
    def values(row: str) -> list[str]:
        return [v for v in row.split(",") if v]

    assert [values(r) for r in after[1:len(before)]] == [values(r) for r in before[1:]]
    res = json.loads(next(csv_file.parent.parent.glob("results.json")).read_text())
    assert res["stages"]["finetune"]["epochs"] == 3


def test_wandb_offline_logged_keys_read_back(tmp_path):
    long_dir = tmp_path / ("a_cache_folder_whose_path_is_longer_than_wandbs_tag_limit_" * 2)
    out = prunelab(tmp_path, *FAST, "logger=wandb", "tags=[ablation,sweep_2]", "method=random",
                   "allocation=uniform", f"paths.cache_dir={long_dir}")
    assert out.returncode == 0, out.stderr
    runs = list(tmp_path.glob("outputs/runs/**/wandb/offline-run-*"))
    assert len(runs) == 1, list(tmp_path.glob("outputs/runs/**/wandb/*"))
    logged = read_offline_run(runs[0])
    history_keys = {k for row in logged["history"] for k in row}
    assert {"pretrain/train/loss", "pretrain/train/acc", "pretrain/val/acc", "finetune/test/acc"} <= history_keys
    summary = logged["summary"]
    for key in ("pretrain/test/acc", "prune/sparsity/direct", "prune/sparsity/effective", "finetune/test/acc",
                "test_acc", "sparsity_direct", "compression_effective", "val_acc_best"):
        assert key in summary, (key, sorted(summary))
    assert summary["sparsity_direct"] == pytest.approx(0.9, abs=1e-3)
    # the run config: the resolved config, flattened, with each group's option name (not final/* metrics)
    config = logged["config"]
    assert config["method"] == "random" and config["allocation"] == "uniform" and config["model"] == "lenet_300_100"
    assert config["data"] == "synthetic" and config["schedule"] == "oneshot" and config["finetune"] == "vanilla"
    assert config["prune.sparsity"] == 0.9 and config["seed"] == 0 and config["pretrain.optimizer.lr"] == 0.1
    assert config["data.num_train"] == 256 and len(config["run_id"]) == 10
    assert not any(k.startswith(("final/", "logger.", "hydra")) or k.endswith("_target_") for k in config)
    # curated short tags plus the user's; W&B's 64-character limit never reached; readable name; group
    assert logged["tags"] == ["method=random", "allocation=uniform", "schedule=oneshot", "target=direct",
                              "sparsity=0.9", "model=lenet_300_100", "data=synthetic", "seed=0", "ablation",
                              "sweep_2"]
    assert logged["name"] == "random sparsity=0.9 seed=0"
    assert logged["group"] == "default"


def test_wandb_offline_false_wins_over_the_cli_default(tmp_path):
    """logger.wandb.offline=false asks W&B to go online even though the CLI sets WANDB_MODE=offline: with no
    API key (HOME and the W&B config moved to an empty folder; the server address unreachable) W&B then
    refuses to start without a login, which it never does offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    env.update(HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "wandb_cfg"), WANDB_API_KEY="",
               WANDB_BASE_URL="http://127.0.0.1:9", WANDB_SILENT="true", PYTHONWARNINGS="ignore")

    def run(*extra: str) -> subprocess.CompletedProcess:
        # main() itself, which sets WANDB_MODE=offline unless the environment says otherwise
        return subprocess.run([sys.executable, "-c", "from prunelab.cli import main; main()", *FAST,
                               "logger=wandb", "pretrain.epochs=0", "finetune.epochs=0", *extra],
                              cwd=tmp_path, text=True, capture_output=True, timeout=300, env=env)

    out = run("logger.wandb.offline=false")
    assert out.returncode != 0
    assert "wandb login" in out.stderr or "API key" in out.stderr, out.stderr[-2000:]
    out = run()  # offline, the default: no login needed
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.slow
def test_ddp_cpu_two_processes(tmp_path):
    out = prunelab(tmp_path, *FAST, "trainer=ddp_cpu", "logger=none", "method=random", timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.count("prunelab: final") == 1  # the summary on rank 0 only
    files = results_files(tmp_path)
    assert len(files) == 1  # one results.json, written by rank 0
    res = json.loads(files[0].read_text())
    sync = res["stages"]["finetune"]["mask_sync"]
    assert sync["world_size"] == 2
    assert sync["identical_before_sync"] is True and len(set(sync["digests"])) == 1
    assert res["final"]["sparsity_direct"] == pytest.approx(0.9, abs=1e-3)
