"""What a run records about itself for W&B: curated tags that never exceed W&B's 64-character limit, the
user's tags, readable names, one group per sweep, the flattened config with option names, and an explicit
mode so that logger.wandb.offline=false wins over WANDB_MODE=offline."""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from prunelab.cli import CONFIG_DIR
from prunelab.config import apply_prune_target
from prunelab.runinfo import WANDB_TAG_MAX, flat_config, wandb_group, wandb_name, wandb_tags


def hydra_cfg(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = "/tmp/prunelab_test_out"
    apply_prune_target(cfg, explicit=overrides)  # as run_pipeline does first: the resolved target (0.9 default)
    return cfg


def test_tags_are_curated_short_and_include_the_users():
    cfg = hydra_cfg("method=snip", "allocation=igq", "schedule=at_init", "prune.compression=100",
                    "prune.sparsity=null", "prune.target=effective", "model=lenet5", "data=synthetic", "seed=3",
                    "tags=[" + "x" * 100 + ",mine]", "paths.cache_dir=/" + "very_long_folder/" * 10)
    tags = wandb_tags(cfg)
    assert tags[:8] == ["method=snip", "allocation=igq", "schedule=at_init", "target=effective",
                        "compression=100", "model=lenet5", "data=synthetic", "seed=3"]
    assert tags[9] == "mine" and tags[8].startswith("xxx")
    assert all(len(t) <= WANDB_TAG_MAX for t in tags)
    assert not any("cache_dir" in t for t in tags)  # overrides are not tags


def test_structured_and_bayesian_targets_in_tags_and_names():
    cfg = hydra_cfg("method=taylor_fo", "schedule=iterative_structured", "method.amount=0.5")
    assert "flops=0.5" in wandb_tags(cfg) and not any(t.startswith("sparsity=") for t in wandb_tags(cfg))
    assert wandb_name(cfg) == "taylor_fo flops=0.5 seed=0"
    cfg = hydra_cfg("method=bmrs_u", "schedule=bayesian")
    assert wandb_name(cfg) == "bmrs_u seed=0"  # the rule decides how much to prune: no target
    cfg = hydra_cfg("method=magnitude", "prune.target=effective", "prune.sparsity=0.99", "seed=2")
    assert wandb_name(cfg) == "magnitude effective sparsity=0.99 seed=2"


def test_one_group_per_sweep():
    assert wandb_group(hydra_cfg("name=abl")) == "abl"  # a single run: its name
    cfg = hydra_cfg("hydra.mode=MULTIRUN", "hydra.sweep.dir=/x/outputs/multirun/abl_2024-05-01")
    assert wandb_group(cfg) == "multirun/abl_2024-05-01"
    other = hydra_cfg("hydra.mode=MULTIRUN", "hydra.sweep.dir=/x/outputs/multirun/abl_2024-05-02")
    assert wandb_group(other) != wandb_group(cfg)


def test_flat_config_has_option_names_and_no_targets():
    cfg = hydra_cfg("method=bmrs_n", "schedule=bayesian", "model=lenet5")
    flat = flat_config(cfg)
    assert flat["method"] == "bmrs_n" and flat["schedule"] == "bayesian" and flat["model"] == "lenet5"
    assert flat["method.rule"] == "bmrs_n" and flat["prune.sparsity"] == 0.9
    assert not any(k.endswith("_target_") or k.startswith(("logger.", "hydra")) for k in flat)
    assert all(isinstance(k, str) and "." not in k.split(".")[0] for k in flat)


def test_logger_node_resolves_name_tags_group_config_and_mode():
    cfg = hydra_cfg("logger=wandb", "method=random", "tags=[t1]")
    node = OmegaConf.to_container(cfg.logger.wandb, resolve=True)
    assert node["mode"] == "offline" and node["name"] == "random sparsity=0.9 seed=0"
    assert node["tags"][-1] == "t1" and node["group"] == "default" and node["config"]["method"] == "random"
    cfg = hydra_cfg("logger=wandb", "logger.wandb.offline=false")
    lg = instantiate(cfg.logger.wandb)  # nothing is started until the first log
    assert lg._wandb_init["mode"] == "online"
    assert isinstance(lg._wandb_init["config"], dict) and isinstance(lg._wandb_init["tags"], list)
