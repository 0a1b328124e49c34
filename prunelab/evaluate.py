"""``prunelab-eval``: evaluate a finished run or a saved model on a dataset.

    prunelab-eval outputs/runs/default/<run_id>                          # the run's own test set and trainer
    prunelab-eval outputs/runs/default/<run_id> data=mnist data.batch_size=256 trainer=gpu
    prunelab-eval outputs/runs/default/<run_id>/model_final.pt measure.latency=false
    prunelab-eval elsewhere/model_final.pt data=mnist paths.data_dir=/data     # a file outside its run folder

Reports test accuracy and loss, direct and effective sparsity (and compression), parameters, FLOPs and, with
``measure.latency`` (the run's setting unless overridden), CPU latency, under the keys of ``results.json``'s
``final`` block (``test_acc``, ``sparsity_effective``, ``params_remaining``, ``flops_remaining``,
``latency_ms_b1``, ...); writes them to ``eval.json`` in the run folder (or next to the model file; ``-o`` for
another name), never to ``results.json``.

The model: a run folder's ``model_final.pt`` (unstructured: masked network, rebuilt from its config),
``model_compact.pt`` (structured: the compacted network), or else its last stage record (``stages/finetune.pt``).
The configuration: the run's ``.hydra/config.yaml`` with the run's resolved ``paths`` (from ``results.json``),
so a run folder needs nothing else; overrides use Hydra's syntax and may change ``data`` (``data=mnist``
composes that option of ``conf/data/`` with ``hydra.searchpath`` honoured), ``trainer``, ``paths`` and
``measure``. The numbers come from the pipeline's own functions (``RunContext.evaluate``, ``sparsity_metrics``,
``cost``, ``structure_metrics``): evaluating a run's own model on its own data reproduces its ``final`` block.
A structured model's sparsity is measured against the dense network of the run's model config, as in the run,
with the masks of the pruned units its compaction kept (from the run's stage record: :func:`kept_unit_masks`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger("prunelab.eval")

OVERRIDABLE = ("data", "trainer", "paths", "measure")  # what evaluating can change; the model is the file's
WEIGHT_OPTIONS = ("weights", "pretrained", "pretrained_file", "weights_name")  # model options that load weights
MODEL_FILES = ("model_final.pt", "model_compact.pt", "stages/finetune.pt", "stages/prune.pt")


def kept_unit_masks(run_dir: Path | None) -> Any:
    """The masks of the pruned units a run's ``model_compact.pt`` still holds, zero (a layer whose units were
    all pruned keeps one; a unit a residual addition reads stays), from the run's last stage record: the bare
    module does not carry them, and without them a collapsed network would be measured as connected."""
    import torch

    from prunelab.pruning.masks import MaskSet

    records = [run_dir / "stages" / f"{s}.pt" for s in ("finetune", "prune")] if run_dir else []
    record = next((r for r in records if r.is_file()), None)
    if record is None:
        return None
    masks = torch.load(record, map_location="cpu", weights_only=False).get("masks")
    return MaskSet.from_state_dict(masks) if masks is not None else None


def find_model(path: Path) -> tuple[Path, Path | None]:
    """(model file, run folder or None) for a run folder or a model file."""
    if path.is_dir():
        for name in MODEL_FILES:
            if (path / name).is_file():
                return path / name, path
        raise FileNotFoundError(f"{path} holds no model: expected one of {', '.join(MODEL_FILES)}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such run folder or model file")
    for folder in (path.parent, path.parent.parent):
        if (folder / "results.json").is_file() or (folder / ".hydra" / "config.yaml").is_file():
            return path, folder
    return path, None


def run_config(run_dir: Path | None) -> DictConfig | None:
    """The configuration the run was made with: its ``.hydra/config.yaml`` (interpolations kept, so that
    ``paths.data_dir=...`` still moves ``data.data_dir``) with ``paths`` as the run resolved them
    (``results.json``), or re-rooted at the current directory for an unfinished run; ``results.json``'s
    resolved config when the ``.hydra`` folder is gone."""
    from prunelab.utils.io import read_json

    results, saved = (run_dir / "results.json", run_dir / ".hydra" / "config.yaml") if run_dir else (None, None)
    if saved is not None and saved.is_file():
        cfg = OmegaConf.load(saved)
        if results.is_file():
            cfg.paths = read_json(results)["config"]["paths"]
        else:
            root = os.getcwd()
            cfg.paths = {"root": root, "data_dir": f"{root}/data", "cache_dir": f"{root}/outputs/cache",
                         "output_dir": str(run_dir)}
    elif results is not None and results.is_file():
        cfg = OmegaConf.create(read_json(results)["config"])
    else:
        return None
    cfg.pop("logger", None)  # evaluation logs nowhere (and W&B tags interpolate Hydra's runtime)
    return cfg


def _compose(overrides: list[str]) -> DictConfig:
    """prunelab's own config composed with ``overrides`` (Hydra's compose API: groups, searchpath, checks)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from prunelab.cli import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # resolves ${hydra:runtime.cwd} in paths
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def eval_config(base: DictConfig | None, overrides: list[str]) -> DictConfig:
    """``base`` (the run's config) with ``overrides`` applied. A group choice (``data=mnist``) replaces that
    node by the option composed by Hydra (with the overrides under it), whose interpolations then resolve
    against the run's ``paths`` and ``seed``; other overrides set a key of the run's config."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    hydra_args = [o.input_line for o in parsed if o.key_or_group.startswith("hydra.")]
    parsed = [o for o in parsed if not o.key_or_group.startswith("hydra.")]
    for o in parsed:
        top = o.key_or_group.split(".")[0].split("@")[0]
        if top not in OVERRIDABLE:
            raise ValueError(f"{o.input_line!r} cannot be changed when evaluating a saved model; "
                             f"allowed: {', '.join(OVERRIDABLE)} (groups and keys), hydra.searchpath")
        if o.is_sweep_override():
            raise ValueError(f"{o.input_line!r} is a sweep; evaluate one setting at a time")
    groups = {o.key_or_group for o in parsed if "." not in o.key_or_group and o.key_or_group in ("data", "trainer")}
    if base is None:  # a model file without its run: everything from prunelab's defaults and the overrides
        if "data" not in groups:
            raise ValueError("no run config found next to the model file; give the data, e.g. "
                             "prunelab-eval model_final.pt data=mnist")
        cfg = _compose(hydra_args + [o.input_line for o in parsed])
        with open_dict(cfg):
            del cfg["model"]  # the default model is not this file's: the file says what it is
        return cfg
    cfg = OmegaConf.create(OmegaConf.to_container(base, resolve=False))
    if groups:
        under = [o.input_line for o in parsed if o.key_or_group.split(".")[0] in groups]
        composed = _compose(hydra_args + under)
        for g in groups:
            cfg[g] = OmegaConf.to_container(composed[g], resolve=False)
    for o in parsed:
        key = o.key_or_group
        if key.split(".")[0] in groups or key in groups:
            continue
        if o.is_delete():
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            if node is None or leaf not in node:
                raise ValueError(f"{key} is not a key of the run's config")
            del node[leaf]
            continue
        if OmegaConf.select(cfg, key, default="__absent__") == "__absent__" and not (o.is_add() or o.is_force_add()):
            raise ValueError(f"{key} is not a key of the run's config (use +{key}=... to add it)")
        OmegaConf.update(cfg, key, o.value(), merge=True, force_add=True)
    return cfg


def single_process_trainer(cfg: DictConfig, overridden: bool) -> None:
    """Evaluation runs in this one process: a DDP run's trainer becomes one device unless overridden."""
    if overridden or "ddp" not in str(cfg.trainer.get("strategy", "auto")):
        return
    log.info("evaluating on one device (the run used %s)", cfg.trainer.strategy)
    cfg.trainer.strategy, cfg.trainer.devices, cfg.trainer.num_nodes = "auto", 1, 1
    cfg.trainer.pop("sync_batchnorm", None)


def final_keys(metrics: dict[str, Any], prefix: str = "eval/") -> dict[str, Any]:
    """``eval/test/acc`` -> ``test_acc``, ``eval/structure/speedup_b1`` -> ``speedup_b1``: results.json's names."""
    out = {}
    for key, value in metrics.items():
        key = key[len(prefix):] if key.startswith(prefix) else key
        key = key[len("structure/"):] if key.startswith("structure/") else key
        out[key.replace("/", "_")] = bool(value) if key == "layer_collapse" else value
    return out


def evaluate(path: str | Path, overrides: list[str] | None = None, output: str | Path | None = None
             ) -> dict[str, Any]:
    """Evaluate the run folder or model file ``path``; returns the eval record (also written as JSON)."""
    import torch
    from hydra.utils import instantiate

    from prunelab.export import COMPACT_FILE, load_model_file
    from prunelab.models.registry import check_model_fits
    from prunelab.pipeline.context import RunContext
    from prunelab.utils.io import atomic_write_json

    overrides = list(overrides or [])
    model_file, run_dir = find_model(Path(path))
    out_file = Path(output) if output else (run_dir or model_file.parent) / "eval.json"
    if out_file.name == "results.json":
        raise ValueError("-o must not be results.json (the run's own record)")
    cfg = eval_config(run_config(run_dir), overrides)
    single_process_trainer(cfg, any(o.split("=")[0].lstrip("+~").split(".")[0] == "trainer" for o in overrides))

    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    input_shape, num_classes = tuple(dm.input_shape), int(dm.num_classes)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True) if "model" in cfg else None
    model, masks, rebuilt = load_model_file(model_file, model_cfg, input_shape, num_classes)
    if model_file.name == COMPACT_FILE:  # the bare module: the units it kept are in the run's stage record
        masks = kept_unit_masks(run_dir)
    check_model_fits(model, model_file.name, input_shape, num_classes)  # a clear error for data of another shape
    ctx = RunContext(cfg=cfg, run_dir=out_file.parent, cache_dir=out_file.parent, datamodule=dm, scorer=None,
                     allocation=None, finetune=None, schedule=None, sparsity=None, loggers=[])
    metrics = ctx.evaluate(model, "eval", masks)
    if rebuilt and masks is not None:  # a masked network: direct and effective sparsity of its masks
        metrics.update(ctx.sparsity_metrics(model, masks, "eval")["metrics"])
        cost = ctx.cost(model)
        metrics.update({f"eval/{k}": v for k, v in cost.items() if k.startswith("latency")})
    elif model_cfg is not None:  # a compacted network (with the units it kept): against the run's dense network
        architecture = {k: v for k, v in model_cfg.items() if k not in WEIGHT_OPTIONS}  # no weights needed
        dense = instantiate(architecture, input_shape=input_shape, num_classes=num_classes)
        metrics.update(ctx.structure_metrics(ctx.cost(dense), ctx.cost(model), "eval", model, masks))
    else:  # a plain network without its run: its own cost, sparsity unknown
        metrics.update({f"eval/{k}": v for k, v in ctx.cost(model).items()})
    record = {
        "source": str(model_file.resolve()),
        "run_dir": str(run_dir.resolve()) if run_dir else None,
        "overrides": overrides,
        "metrics": final_keys(metrics),
        "config": {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("data", "model", "trainer", "measure")
                   if k in cfg},
        "torch": torch.__version__,
    }
    atomic_write_json(record, out_file)
    record["eval_file"] = str(out_file)
    return record


def _print(record: dict[str, Any]) -> None:
    metrics = record["metrics"]
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        shown = f"{value:.6g}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {shown}")
    print(f"eval file: {record['eval_file']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="prunelab-eval", description="Evaluate a finished prunelab run or a saved model: accuracy, loss, "
        "direct and effective sparsity, parameters, FLOPs, latency (written to eval.json).",
        epilog="examples: prunelab-eval outputs/runs/default/<run_id> | ... data=mnist data.batch_size=256 | "
               "... trainer=gpu measure.latency=false")
    parser.add_argument("path", help="a run folder, or a model file (model_final.pt, model_compact.pt, stages/*.pt)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of data, trainer, paths, measure")
    parser.add_argument("-o", "--output", help="the JSON file to write (default: eval.json in the run folder, "
                                               "or next to the model file)")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import warnings

    import lightning.pytorch  # noqa: F401  (its loggers exist from here on, to be quietened)

    from prunelab.cli import quiet_lightning

    quiet_lightning()
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    try:
        record = evaluate(args.path, args.overrides, args.output)
    except (ValueError, FileNotFoundError, PermissionError) as e:
        print(f"prunelab-eval: error: {e}", file=sys.stderr)
        sys.exit(2)
    _print(record)


if __name__ == "__main__":
    main()
