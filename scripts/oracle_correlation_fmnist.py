"""Rank correlation of every structured criterion with the oracle on real data (Molchanov et al. 2019,
Tables 1-2 view): LeNet-5 (6-16-120-84) on the full Fashion-MNIST, the dense models that
``scripts/reproduce_taylor_fmnist.sh`` pretrains (read from the pipeline's cache, one per seed).

For each seed: load the cached dense model of ``experiment=taylor_lenet5_fashion_mnist seed=<s>``, score every
unit (6 + 16 conv channels, 120 + 84 fc units) on ``--batches`` validation batches with each criterion and the
oracle ``(E(unit removed) - E(full))^2`` (same batches), and report the Spearman / Kendall correlation of each
criterion with the oracle over all units; then mean ± sd over the seeds as a Markdown table.

    python scripts/oracle_correlation_fmnist.py --seeds 0 1 2 --cache /work/runs/lenet5_fmnist_cache \
        --data-dir /work/runs/taylor_fmnist/data --out oracle.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from scipy.stats import kendalltau, spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prunelab.cli import CONFIG_DIR  # noqa: E402
from prunelab.config import register_configs
from prunelab.pipeline.cache import DenseEntry, data_fingerprint, dense_identity  # noqa: E402
from prunelab.pruning.structured import criteria as C  # noqa: E402
from prunelab.pruning.units.gates import Gates  # noqa: E402
from prunelab.pruning.units.groups import build_groups  # noqa: E402
from prunelab.runinfo import register_resolvers  # noqa: E402

CRITERIA = ["taylor_fo", "taylor_fo_weight", "taylor_so", "l2_norm", "random"]


def config(seed: int, cache: str, data_dir: str, experiment: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={experiment}", f"seed={seed}", f"paths.cache_dir={cache}",
                                           f"paths.data_dir={data_dir}", "paths.root=.", "paths.output_dir=.",
                                           "logger=none"])
    return cfg


def dense_model_file(cache: str | Path, cfg, datamodule) -> Path:
    """Where the pipeline caches the dense model of ``cfg`` (``paths.cache_dir`` = ``cache``)."""
    return DenseEntry(Path(cache), dense_identity(cfg, data_fingerprint(datamodule))).model_file


def correlations(seed: int, args) -> dict[str, tuple[float, float]]:
    cfg = config(seed, args.cache, args.data_dir, args.experiment)
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup()
    dense = dense_model_file(args.cache, cfg, dm)
    if not dense.is_file():
        raise SystemExit(f"seed {seed}: no cached dense model at {dense} (run scripts/reproduce_taylor_fmnist.sh)")
    model = instantiate(cfg.model, input_shape=tuple(dm.input_shape), num_classes=dm.num_classes)
    model.load_state_dict(torch.load(dense, map_location="cpu", weights_only=True))
    model.eval()
    batches = []
    for i, b in enumerate(dm.val_dataloader()):
        if i >= args.batches:
            break
        batches.append(dm.on_after_batch_transfer(b, 0))
    groups = build_groups(model, batches[0][0][:1])
    gates = Gates(model, groups)
    res = C.all_criteria_scores(model, gates, groups, batches, F.cross_entropy, criteria=[*CRITERIA, "oracle"],
                                hessian="exact", seed=seed)
    ids = [g.id for g in groups]
    oracle = torch.cat([res["oracle"][g] for g in ids])
    out = {}
    for c in CRITERIA:
        s = torch.cat([res[c][g] for g in ids])
        out[c] = (float(spearmanr(s, oracle).statistic), float(kendalltau(s, oracle).statistic))
    print(f"seed {seed} ({len(oracle)} units, {len(batches)} batches of {len(batches[0][1])}): "
          + ", ".join(f"{c} {v[0]:.3f}/{v[1]:.3f}" for c, v in out.items()), flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--cache", required=True, help="paths.cache_dir of the Taylor grid (dense models)")
    p.add_argument("--data-dir", required=True, help="paths.data_dir of the Taylor grid")
    p.add_argument("--experiment", default="taylor_lenet5_fashion_mnist")
    p.add_argument("--batches", type=int, default=8, help="validation batches (data.eval_batch_size each)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    register_configs()
    register_resolvers()
    torch.set_num_threads(1)
    rows = {}
    for s in args.seeds:
        try:
            rows[s] = correlations(s, args)
        except SystemExit as e:
            print(e, flush=True)
    if not rows:
        raise SystemExit("no seed had a cached dense model")

    def cell(c: str, k: int) -> str:
        v = [r[c][k] for r in rows.values()]
        sd = statistics.stdev(v) if len(v) > 1 else float("nan")
        return f"{statistics.mean(v):.3f} ± {sd:.3f}"

    lines = [f"Seeds with a dense model: {sorted(rows)} (n = {len(rows)}); "
             f"{args.batches} validation batches per seed; all 226 units of LeNet-5.", "",
             "| criterion | Spearman (mean ± sd) | Kendall (mean ± sd) |", "|---|---|---|"]
    lines += [f"| {c} | {cell(c, 0)} | {cell(c, 1)} |" for c in CRITERIA]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
