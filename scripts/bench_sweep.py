"""Sweep throughput: the same small runs (LeNet-300-100, synthetic MNIST-shaped data, 1 pretraining and 1
fine-tuning epoch by default) in a grid: ``--grid methods`` (8 runs, methods magnitude/random x 4
sparsities, one seed: one shared dense pretraining) or ``--grid seeds`` (``--seeds`` runs, seeds 0..N-1 x
magnitude at 90%: one dense pretraining per seed, the 10-seed paper table), run

- ``separate``: one ``prunelab`` process per run, one after the other (a shell loop);
- ``sequential``: ``prunelab --multirun`` with Hydra's basic launcher (every job in one process, in turn);
- ``joblib``: ``prunelab --multirun experiment=sweep_local`` (joblib/loky launcher, ``n_jobs`` processes);
- ``joblib_1thread``: the same with ``OMP_NUM_THREADS=1`` (one intra-op thread per job, no oversubscription);
- ``vectorized``: ``prunelab --multirun experiment=vectorized`` (one process, the training stages of all jobs
  trained as one vmapped model; ``prunelab/vectorized``);

each in a fresh directory (so every variant pretrains the dense model once, under the shared-cache lock, and
reuses it for the other 7 runs). Then the per-run fixed overhead, measured apart from the sweeps:

- process start: ``python -c pass``, ``python -c "import prunelab.cli"`` (the CLI module) and the imports of
  a run (the pipeline, hence torch and Lightning, plus the data and model packages), each in a new process;
- in one warm process: Hydra composition of the run's config, the data module's preparation (synthetic data
  generated and split), the model build and one Lightning ``Trainer`` construction (a run builds one per fit
  and per evaluation: 5 for a one-shot run).

    python scripts/bench_sweep.py                     # 8 runs, n_jobs 2, 5 repeats of the overhead timings
    python scripts/bench_sweep.py --grid seeds --variants sequential vectorized --skip-overhead
    python scripts/bench_sweep.py --sweep-repeats 3 --variants sequential joblib
    python scripts/bench_sweep.py --skip-sweeps       # overhead only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

BASE = ["data=synthetic", "data.num_train=2048", "data.num_test=512", "data.batch_size=64",
        "model=lenet_300_100", "pretrain.epochs=1", "finetune.epochs=1", "logger=none",
        "trainer.enable_progress_bar=false"]
METHODS = ["magnitude", "random"]
SPARSITIES = ["0.5", "0.7", "0.8", "0.9"]

RUN_IMPORTS = ("import prunelab.cli; from prunelab.pipeline.run import run_pipeline; "
               "from prunelab.data import SyntheticDataModule; from prunelab.models import build_model")
# What the data package imported eagerly before it was made lazy (every dataset module: scikit-learn for
# digits, torchvision's datasets and transforms v2): measured side by side with RUN_IMPORTS.
EAGER_DATA = "; import prunelab.data.digits, prunelab.data.folder, prunelab.data.npz, prunelab.data.vision"
LIBS = "import torch, lightning.pytorch, hydra.utils"


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONWARNINGS="ignore")
    env.update(extra)
    return env


def _cli(cwd: Path, args: list[str], env: dict[str, str]) -> None:
    out = subprocess.run([sys.executable, "-m", "prunelab.cli", *args], cwd=cwd, env=env, text=True,
                         capture_output=True)
    if out.returncode != 0:
        raise RuntimeError(f"prunelab {' '.join(args)} failed:\n{out.stderr[-3000:]}")


def _count_results(cwd: Path) -> int:
    return len(list(cwd.glob("outputs/**/results.json")))


def grid_runs(grid: str, seeds: int) -> list[list[str]]:
    """The overrides of every run of the grid."""
    if grid == "methods":
        return [[f"method={m}", f"prune.sparsity={s}"] for m in METHODS for s in SPARSITIES]
    return [[f"seed={k}", "method=magnitude", "prune.sparsity=0.9"] for k in range(seeds)]


def grid_sweep(grid: str, seeds: int) -> list[str]:
    """The same grid as multirun overrides."""
    if grid == "methods":
        return [f"method={','.join(METHODS)}", f"prune.sparsity={','.join(SPARSITIES)}"]
    return [f"seed={','.join(str(k) for k in range(seeds))}", "method=magnitude", "prune.sparsity=0.9"]


def sweep_variants(n_jobs: int, base: list[str], grid: str = "methods", seeds: int = 10
                   ) -> dict[str, tuple[list[list[str]], dict[str, str]]]:
    sweep = grid_sweep(grid, seeds)
    separate = [[*base, *run] for run in grid_runs(grid, seeds)]
    joblib = ["-m", "experiment=sweep_local", f"hydra.launcher.n_jobs={n_jobs}", *base, *sweep]
    return {
        "separate": (separate, _env()),
        "sequential": ([["-m", *base, *sweep]], _env()),
        "joblib": ([joblib], _env()),
        "joblib_1thread": ([joblib], _env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")),
        "vectorized": ([["-m", "experiment=vectorized", *base, *sweep]], _env()),
    }


def time_sweeps(n_jobs: int, variants: list[str], repeats: int = 1, base: list[str] = BASE,
                grid: str = "methods", seeds: int = 10) -> dict[str, float]:
    """Median wall time of each variant over ``repeats`` rounds, the variants interleaved in every round (so
    that drifts in the machine's load hit them alike); each sweep in a fresh directory (fresh cache)."""
    runs = len(grid_runs(grid, seeds))
    times: dict[str, list[float]] = {}
    for _ in range(repeats):
        for name, (commands, env) in sweep_variants(n_jobs, base, grid, seeds).items():
            if name not in variants:
                continue
            cwd = Path(tempfile.mkdtemp(prefix=f"bench_sweep_{name}_"))
            try:
                t = time.perf_counter()
                for args in commands:
                    _cli(cwd, args, env)
                times.setdefault(name, []).append(time.perf_counter() - t)
                got = _count_results(cwd)
                if got != runs:
                    raise RuntimeError(f"{name}: {got} results.json, expected {runs}")
                if name == "vectorized":  # every run's fine-tuning trained by the vectorised loop
                    recs = [json.loads(p.read_text()) for p in cwd.glob("outputs/**/vectorized.json")]
                    if sum("finetune" in r.get("stages", {}) for r in recs) != runs:
                        raise RuntimeError("vectorized: some runs fell back to the normal way (see the log)")
            finally:
                shutil.rmtree(cwd, ignore_errors=True)
            print(f"  {name}: {times[name][-1]:.1f} s", flush=True)
    return {k: statistics.median(v) for k, v in times.items()}


def _subprocess_time(code: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, env=_env(), cwd=ROOT)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def process_overhead(repeats: int) -> dict[str, float]:
    return {
        "python -c pass": _subprocess_time("pass", repeats),
        "python -c 'import prunelab.cli'": _subprocess_time("import prunelab.cli", repeats),
        "imports: torch + Lightning + Hydra only": _subprocess_time(LIBS, repeats),
        "imports of a run (pipeline, torch, Lightning, data, models)": _subprocess_time(RUN_IMPORTS, repeats),
        "imports of a run + every dataset module (the eager data package)":
            _subprocess_time(RUN_IMPORTS + EAGER_DATA, repeats),
    }


def in_process_overhead(repeats: int) -> dict[str, float]:
    """Median seconds of each fixed per-run step in a warm process (imports done)."""
    import lightning.pytorch  # noqa: F401  (its loggers exist before they are quietened)
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate
    from omegaconf import open_dict

    from prunelab.cli import CONFIG_DIR, quiet_lightning

    quiet_lightning()
    tmp = Path(tempfile.mkdtemp(prefix="bench_sweep_overhead_"))

    def composed():
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("config", overrides=[*BASE, "method=magnitude", "prune.sparsity=0.9"])
        with open_dict(cfg):
            cfg.paths.root = str(tmp)
            cfg.paths.output_dir = str(tmp / "run")
        return cfg

    cfg = composed()

    def data():
        dm = instantiate(cfg.data)
        dm.prepare_data()
        dm.setup("fit")
        return dm

    dm = data()

    def model():
        return instantiate(cfg.model, input_shape=tuple(dm.input_shape), num_classes=int(dm.num_classes))

    def trainer():
        return instantiate(cfg.trainer, max_epochs=1, logger=False, callbacks=[], enable_checkpointing=False,
                           default_root_dir=str(tmp))

    steps = {"Hydra compose": composed, "data module prepare + setup (synthetic)": data,
             "model build (LeNet-300-100)": model, "Lightning Trainer construction (one)": trainer}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for fn in steps.values():
        fn()  # warm-up
    for _ in range(repeats):
        for k, fn in steps.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    shutil.rmtree(tmp, ignore_errors=True)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-jobs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="repeats of each overhead timing (median)")
    ap.add_argument("--variants", nargs="+",
                    default=["separate", "sequential", "joblib", "joblib_1thread", "vectorized"])
    ap.add_argument("--grid", choices=["methods", "seeds"], default="methods")
    ap.add_argument("--seeds", type=int, default=10, help="runs of --grid seeds")
    ap.add_argument("--pretrain-epochs", type=int, default=1)
    ap.add_argument("--finetune-epochs", type=int, default=1)
    ap.add_argument("--skip-overhead", action="store_true", help="only the sweeps")
    ap.add_argument("--sweep-repeats", type=int, default=1, help="interleaved rounds of the sweeps (median)")
    ap.add_argument("--skip-sweeps", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    args = ap.parse_args()

    from _bench import machine

    base = [b for b in BASE if not b.startswith(("pretrain.epochs=", "finetune.epochs="))]
    base += [f"pretrain.epochs={args.pretrain_epochs}", f"finetune.epochs={args.finetune_epochs}"]
    runs = len(grid_runs(args.grid, args.seeds))
    print(f"# sweep throughput\nmachine: {machine()}\nload average before: {os.getloadavg()}\n")
    print(f"{runs} runs: {' '.join(base)} x {' '.join(grid_sweep(args.grid, args.seeds))}\n")
    result: dict[str, dict[str, float]] = {}
    if not args.skip_sweeps:
        print("sweeps (wall time):", flush=True)
        sweeps = time_sweeps(args.n_jobs, args.variants, args.sweep_repeats, base, args.grid, args.seeds)
        result["sweeps_s"] = sweeps
        ref = sweeps.get("sequential")
        print(f"\n| variant (median of {args.sweep_repeats}) | wall s | s / run | time vs sequential | "
              "throughput vs sequential |\n|---|---|---|---|---|")
        for k, v in sweeps.items():
            ratio = f"{v / ref:.2f}x" if ref else "-"
            speed = f"{ref / v:.2f}x" if ref else "-"
            print(f"| {k} | {v:.1f} | {v / runs:.2f} | {ratio} | {speed} |")
        if ref and "joblib" in sweeps:
            print(f"\nspeed-up joblib (n_jobs={args.n_jobs}) over sequential: {ref / sweeps['joblib']:.2f}x")
        if ref and "separate" in sweeps:
            print(f"extra cost of one process per run: {(sweeps['separate'] - ref) / runs:.2f} s per run")
        if ref and "vectorized" in sweeps:
            print(f"throughput vectorized over sequential: {ref / sweeps['vectorized']:.2f}x (target >= 3x)")
    if args.skip_overhead:
        print(f"\nload average after: {os.getloadavg()}")
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        return
    print(f"\nper-run fixed overhead (median of {args.repeats}):", flush=True)
    proc = process_overhead(args.repeats)
    inproc = in_process_overhead(args.repeats)
    result["process_s"], result["in_process_s"] = proc, inproc
    print("\n| step | s |\n|---|---|")
    for k, v in {**proc, **inproc}.items():
        print(f"| {k} | {v:.3f} |")
    print(f"\nload average after: {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
