"""The README is executable: every ``prunelab`` / ``prunelab-report`` / ``prunelab-eval`` command it shows runs.

Each command is taken from the README as written and *reduced* (tiny synthetic data of the named dataset's
shape, one epoch of two batches, at most two values per swept option, CPU stand-ins for GPU / SLURM
launchers, W&B offline), then run through the real CLI in one scratch folder, in README order (so a
``prunelab-report`` finds the sweep above it). A command that fails fails the suite. ``bash scripts/...``
lines are checked for syntax and for the scripts they name.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
COMMANDS = ("prunelab", "prunelab-report", "prunelab-eval")

# dataset option -> synthetic stand-in of the same shape (no download here)
SHAPES = {
    "mnist": ([1, 28, 28], 10), "fashion_mnist": ([1, 28, 28], 10), "npz": ([3, 32, 32], 10),
    "cifar10": ([3, 32, 32], 10), "cifar100": ([3, 32, 32], 100), "tiny_imagenet": ([3, 32, 32], 200),
    "imagenet": ([3, 32, 32], 1000),  # smaller than the real images: ResNet-50 on CPU in a minute
}
FAST = {
    "data.num_train": "128", "data.num_test": "64", "data.batch_size": "32", "pretrain.epochs": "1",
    "finetune.epochs": "1", "trainer.limit_train_batches": "2", "trainer.limit_val_batches": "1",
    "trainer.limit_test_batches": "1", "trainer.enable_progress_bar": "false", "measure.latency": "false",
}
SYNTHETIC_ONLY = ("data.num_train", "data.num_test")  # options of the synthetic stand-in only
TRAINING_SCHEDULES = {"train_prune", "iterative_structured", "bayesian"}  # those with a schedule.epochs


def readme_commands(text: str) -> list[str]:
    """Commands from the README's ``bash`` blocks (continuations joined, comments dropped) and from inline
    code spans that start with a prunelab command, in order of appearance."""
    found: list[tuple[int, str]] = []
    for block in re.finditer(r"```bash\n(.*?)```", text, re.S):
        body = block.group(1).replace("\\\n", " ")
        for i, line in enumerate(body.splitlines()):
            line = re.sub(r"\s#.*$", "", line).strip()
            if line and (line.split()[0] in COMMANDS or line.startswith(("make ", "bash scripts/"))):
                found.append((block.start() + i, line))
    outside = re.sub(r"```.*?```", lambda m: " " * len(m.group(0)), text, flags=re.S)
    for span in re.finditer(r"`([^`\n]+)`", outside):
        words = span.group(1).split()
        if len(words) > 1 and words[0] in COMMANDS and "<" not in span.group(1):
            found.append((span.start(), span.group(1).strip()))
    return [c for _, c in sorted(found)]


def _swept(value: str) -> bool:
    return "," in value and not value.startswith(("[", "{")) and "(" not in value


def _sweep(value: str, keep: int = 2) -> str:
    """At most ``keep`` values of a swept option (``a,b,c`` -> ``a,b``); lists and functions are left alone."""
    return ",".join(value.split(",")[:keep]) if _swept(value) else value


def overlay_choice(experiment: str | None, group: str) -> str | None:
    """The option of ``group`` an experiment overlay selects (``override /<group>: X``), if any."""
    if not experiment:
        return None
    overlay = ROOT / "conf" / "experiment" / f"{experiment.strip('[]').split(',')[0]}.yaml"
    match = re.search(rf"override /{group}:\s*(\w+)", overlay.read_text()) if overlay.exists() else None
    return match.group(1) if match else None


def overlay_grid(experiment: str | None) -> dict[str, str]:
    """The grid an experiment overlay declares for ``--multirun`` (``hydra.sweeper.params``), as strings."""
    import yaml

    grid = {}
    for name in (experiment or "").strip("[]").split(","):
        overlay = ROOT / "conf" / "experiment" / f"{name}.yaml"
        if name and overlay.exists():
            params = ((yaml.safe_load(overlay.read_text()) or {}).get("hydra") or {}).get("sweeper", {})
            grid.update({k: str(v) for k, v in (params or {}).get("params", {}).items()})
    return grid


def reduce_command(line: str) -> list[str] | None:
    """The README command as a fast, offline, CPU-only argument list (None: not a prunelab run)."""
    words = shlex.split(line.replace("<sweep id>", "<sweep_id>"))
    if words[0] == "make":
        if words[1:] != ["demo"]:
            return None  # `make test` is what runs this file
        words = ["prunelab", "experiment=demo"]
    if words[0] == "prunelab-eval":  # evaluated on the run's own (tiny) data, not a download
        words = [w for w in words if not re.match(r"data=\w+$", w)]
    if words[0] != "prunelab":
        return [sys.executable, "-m", {"prunelab-report": "prunelab.report.cli",
                                       "prunelab-eval": "prunelab.evaluate"}[words[0]], *words[1:]]
    if len(words) > 1 and words[1].startswith("--") and words[1] not in ("--multirun",):
        return [sys.executable, "-m", "prunelab.cli", *words[1:]]  # --help, --cfg job, --version
    flags, opts = [], {}
    for w in words[1:]:
        if w.startswith("-"):
            flags.append(w)
            continue
        key, _, value = w.partition("=")
        # a grid keeps two values of its first swept option and one of the others (2 jobs, not 2^k): the
        # multirun machinery, the sweep folder and the report still see several jobs
        first = not any(_swept(v) for k, v in opts.items() if k != "experiment")
        opts[key] = _sweep(value, 2 if key == "experiment" or first else 1)
    data = opts.get("data") or overlay_choice(opts.get("experiment"), "data")
    if data in SHAPES:
        shape, classes = SHAPES[data]
        opts = {k: v for k, v in opts.items() if not (k.startswith("data.") and k != "data.batch_size")}
        opts.update({"data": "synthetic", "data.input_shape": str(shape).replace(" ", ""),
                     "data.num_classes": str(classes)})
        if classes > int(FAST["data.num_train"]):  # the synthetic set holds every class
            opts["data.num_train"] = str(classes)
    synthetic = opts.get("data") == "synthetic"
    if "trainer" not in opts and overlay_choice(opts.get("experiment"), "trainer") in ("gpu", "ddp"):
        opts["trainer"] = overlay_choice(opts.get("experiment"), "trainer")  # an overlay's GPU trainer: below
    if opts.get("trainer") == "gpu":
        opts["trainer"] = "cpu"
    if opts.get("trainer") == "ddp":
        opts["trainer"], opts["trainer.devices"] = "ddp_cpu", "2"
    if opts.get("logger.wandb.offline") == "false":
        opts["logger.wandb.offline"] = "true"  # no network here
    overlays = opts.get("experiment", "").strip("[]").split(",")
    if "slurm" in overlays:  # no cluster: the same grid on the local launcher
        rest = [o for o in overlays if o != "slurm"]
        opts.pop("experiment")
        if rest:
            opts["experiment"] = rest[0] if len(rest) == 1 else f"[{','.join(rest)}]"
        opts = {k: v for k, v in opts.items() if not k.startswith("hydra.launcher.")}
    # no network: pretrained weights are loaded from a local cache in tests/test_model_sources.py
    if opts.get("model.pretrained") == "true":
        opts["model.pretrained"] = "false"
    opts.pop("model.weights_name", None)
    experiments = opts.get("experiment", "").strip("[]").split(",")
    schedules = {opts.get("schedule") or overlay_choice(e, "schedule") for e in experiments}
    if schedules <= TRAINING_SCHEDULES:  # every job: one short pruning stage
        opts.setdefault("schedule.epochs", "1")
        opts.setdefault("schedule.frequency", "1")
    if "hparams_search" in opts:
        opts["hydra.sweeper.n_trials"] = "2"
    if flags and "hparams_search" not in opts:
        # an overlay's own grid (hydra.sweeper.params) is reduced like the command line's: the command line
        # overrides a swept key, so each grid key gets its first value (two for the first swept option)
        for key, value in overlay_grid(opts.get("experiment")).items():
            if key not in opts:
                first = not any(_swept(v) for k, v in opts.items() if k != "experiment")
                opts[key] = _sweep(value, 2 if first else 1)
    for key, value in FAST.items():
        if key not in opts and (synthetic or key not in SYNTHETIC_ONLY):
            opts[key] = value
    return [sys.executable, "-m", "prunelab.cli", *flags, *(f"{k}={v}" for k, v in opts.items())]


def reduce_commands(line: str) -> list[list[str]]:
    """:func:`reduce_command`, split into one command per overlay when a multirun sweeps overlays of which
    only some prune while training: ``schedule.epochs`` (the length of that stage, 20 epochs in the DLLP
    overlays) can only be shortened on the jobs whose schedule has it."""
    words = shlex.split(line.replace("<sweep id>", "<sweep_id>"))
    swept = [w for w in words if w.startswith("experiment=") and "," in w and not w.startswith("experiment=[")]
    if words[0] != "prunelab" or not swept or "schedule.epochs" in line:
        return [c for c in [reduce_command(line)] if c is not None]
    overlays = swept[0].partition("=")[2].split(",")
    schedules = {overlay_choice(e, "schedule") for e in overlays}
    if schedules <= TRAINING_SCHEDULES or not schedules & TRAINING_SCHEDULES:
        return [reduce_command(line)]
    return [reduce_command(shlex.join(w if w is not swept[0] else f"experiment={e}" for w in words))
            for e in overlays]


def provide_weights(args: list[str], cwd: Path) -> None:
    """A ``model.weights=<file>`` of the README (the user's local checkpoint, e.g. torchvision's ResNet-50) is
    written into ``cwd``: a state dict of the selected architecture for the reduced command's data shape, so
    the command runs the real loading path."""
    opts = dict(a.partition("=")[::2] for a in args if "=" in a and not a.startswith("-"))
    path = opts.get("model.weights")
    if not path or (cwd / path).exists():
        return
    import torch

    from prunelab.models import build_model

    name = opts.get("model") or overlay_choice(opts.get("experiment"), "model")
    shape = [int(v) for v in opts["data.input_shape"].strip("[]").split(",")]
    torch.save(build_model(name, shape, int(opts["data.num_classes"])).state_dict(), cwd / path)


def fill_placeholders(arg: str, cwd: Path) -> str:
    """A README path's placeholder, filled from what the commands above created: ``<sweep id>`` the largest
    sweep (the headline grid), ``<run_id>`` the newest run folder."""
    if "<sweep_id>" in arg:
        sweeps = sorted(cwd.glob("outputs/multirun/*/*/"), key=lambda f: len(list(f.glob("*/results.json"))))
        arg = str(sweeps[-1]) if sweeps else arg
    if "<run_id>" in arg:
        runs = sorted(cwd.glob("outputs/runs/*/*/"), key=lambda f: f.stat().st_mtime)
        arg = str(runs[-1]) if runs else arg
    return arg


ALL = readme_commands(README.read_text())


def test_readme_has_commands():
    assert sum(c.startswith("prunelab ") for c in ALL) >= 10
    assert any(c.startswith("prunelab-report") for c in ALL)


def test_reduction_keeps_what_the_command_selects():
    args = reduce_command("prunelab --multirun data=cifar10 method=snip,grasp,synflow seed=0,1,2")
    assert "data=synthetic" in args and "data.input_shape=[3,32,32]" in args
    assert "method=snip,grasp" in args and "seed=0" in args and "--multirun" in args
    assert reduce_command("make test") is None


def test_mixed_schedule_sweep_is_split_so_each_pruning_stage_is_short():
    line = "prunelab -m experiment=dllp_resnet56_cifar10,dllp_resnet56_cifar10_magnitude prune.sparsity=0.3,0.5"
    runs = reduce_commands(line)
    assert len(runs) == 2
    assert "experiment=dllp_resnet56_cifar10" in runs[0] and "schedule.epochs=1" in runs[0]
    assert "experiment=dllp_resnet56_cifar10_magnitude" in runs[1]
    assert not any(a.startswith("schedule.") for a in runs[1])
    assert all("prune.sparsity=0.3,0.5" in r for r in runs)
    assert reduce_commands("prunelab -m method=a,b,c prune.compression=10,100 seed=0,1,2") == [
        reduce_command("prunelab -m method=a,b prune.compression=10 seed=0")]
    # an overlay's own grid (3 strategies x 3 amounts) is cut the same way: 2 jobs
    args = reduce_command("prunelab -m experiment=overparam_resnet56_cifar10")
    assert "finetune=vanilla,overparam" in args and "method.amount=0.5" in args


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~35 commands in sequence (~6-9 min on 2 cores); `make test` starts it first
def test_readme_commands_run(tmp_path):
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONWARNINGS="ignore",
               PYTHONPATH=str(ROOT))
    failures = []
    for line in ALL:
        if line.startswith("bash scripts/"):
            script = ROOT / shlex.split(line)[1]
            out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
            if not script.exists() or out.returncode:
                failures.append(f"{line}: {out.stderr or 'missing'}")
            continue
        for args in reduce_commands(line):
            args = [fill_placeholders(a, tmp_path) for a in args]
            provide_weights(args, tmp_path)
            out = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            if out.returncode != 0:
                failures.append(f"{line}\n  ran: {' '.join(args[2:])}\n  {(out.stderr or out.stdout)[-1500:]}")
    assert not failures, "README commands that fail:\n" + "\n".join(failures)
