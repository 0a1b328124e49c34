"""Every config option composes; bad input fails early with a clear message."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf.errors import ValidationError

from prunelab.cli import CONFIG_DIR
from prunelab.pipeline.run import run_pipeline, validate
from tests.conftest import compose_config

GROUPS = ["data", "model", "method", "allocation", "schedule", "finetune", "trainer", "logger", "experiment",
          "hparams_search"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


# options whose YAML leaves a value for the user to set (null: refused when constructed, the option named)
REQUIRED = {("data", "npz"): ["data.path=/nonexistent.npz"], ("method", "bmrs_l2"): ["method.amount=0.5"]}


def test_a_required_value_left_unset_is_refused_naming_it(make_cfg):
    from hydra.errors import InstantiationException

    with pytest.raises(InstantiationException, match=r"method.amount=None with method.rule=l2_norm"):
        instantiate(make_cfg("method=bmrs_l2", fast=False).method)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(make_cfg, group, option):
    extra = REQUIRED.get((group, option), [])
    cfg = make_cfg(f"{group}={option}", *extra, fast=False)
    assert cfg.prune.target in ("direct", "effective")
    if group in ("method", "allocation", "schedule", "finetune"):
        instantiate(cfg[group])  # constructs: the YAML's options are the class's options
    if group == "model":
        assert cfg.model.name


def test_every_method_is_named_by_the_option_that_chose_it(make_cfg):
    """One name system: whatever class or criterion a method YAML instantiates, the run's method object is
    named by the YAML's option (``method=random_structured`` is not ``random``, ``snr`` not ``bmrs_n``)."""
    from prunelab.pipeline.run import check_options

    for opt in options("method"):
        schedule = {"bmrs_n": "bayesian", "bmrs_u": "bayesian", "snr": "bayesian", "expected_theta": "bayesian",
                    "bmrs_l2": "bayesian", "dllp": "train_prune", "slimming": "train_prune"}.get(opt, "oneshot")
        cfg = make_cfg(f"method={opt}", f"schedule={schedule}", *REQUIRED.get(("method", opt), []))
        assert check_options(cfg)[1].name == opt, opt


def test_defaults(make_cfg):
    cfg = make_cfg(fast=False)
    assert cfg.data._target_.endswith("DigitsDataModule")
    assert cfg.model.name == "lenet_300_100"
    # neither set: the default target, sparsity 0.9 (both default to null so either can be set alone)
    assert cfg.prune.sparsity is None and cfg.prune.compression is None
    assert validate(cfg) == pytest.approx(0.9)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["prune.sparsity=1.0"], r"prune.sparsity must be in \[0, 1\)"),
        (["prune.sparsity=-0.1"], r"prune.sparsity must be in \[0, 1\)"),
        (["prune.sparsity=0.5", "prune.compression=10"], "not both"),
        (["prune.sparsity=null", "prune.compression=0.5"], r"prune.compression must be a finite number >= 1"),
        (["prune.target=sideways"], "prune.target='sideways'; allowed values: direct, effective"),
        (["+method.foo=1"], r"method.foo is not an option of .*MagnitudeScorer"),
        (["allocation=uniform_plus", "+allocation.maxlast=1"], r"allocation.maxlast is not an option.*max_last"),
        (["pretrain.optimizer.name=lbfgs"], r"optimizer.name='lbfgs'; allowed values: sgd, adam, adamw"),
        (["model=lenet5", "data.input_shape=[1,8,8]"], r"model=lenet5 does not fit the data"),
        (["schedule=iterative", "schedule.rounds=0"], r"schedule.rounds must be >= 1"),
    ],
)
def test_bad_input_fails_before_training(make_cfg, tmp_path, overrides, match):
    cfg = make_cfg(*overrides)
    with pytest.raises((ValueError, TypeError), match=match):
        run_pipeline(cfg)
    assert not list(tmp_path.rglob("dense"))  # nothing was trained


def test_missing_dataset_offline(make_cfg, tmp_path):
    cfg = make_cfg("data=mnist", "data.download=false", "logger=none", fast=False)
    with pytest.raises(FileNotFoundError) as e:
        run_pipeline(cfg)
    msg = str(e.value)
    assert str(tmp_path / "data") in msg and "download" in msg


def test_unwritable_output_dir(make_cfg, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cfg = make_cfg(output_dir=blocker / "run")
    with pytest.raises(PermissionError, match="paths.output_dir"):
        run_pipeline(cfg)


def test_unknown_key_and_wrong_type_fail_at_composition(make_cfg):
    with pytest.raises(ConfigCompositionException, match="sparsty"):
        make_cfg("prune.sparsty=0.5")
    with pytest.raises((ConfigCompositionException, ValidationError)):
        make_cfg("prune.sparsity=abc")
    with pytest.raises(ConfigCompositionException, match="Available options"):
        make_cfg("method=nonexistent")


# A comparison overlay (the arms of one paper table) must train the same dense model as the overlay it is compared
# with: the arms share the cached pretraining only when their dense-cache keys are equal.
PAIRED_OVERLAYS = [("dllp_lenet300_fashion_mnist", "dllp_lenet300_fashion_mnist_units")] + [
    (f"dllp_{s}", f"dllp_{s}_magnitude")
    for s in ("vgg19_cifar10", "resnet18_cifar10", "resnet56_cifar10", "resnet50_imagenet")]


@pytest.mark.parametrize("first,second", PAIRED_OVERLAYS)
def test_paired_overlays_share_the_dense_model(tmp_path, first, second):
    from prunelab.pipeline.cache import dense_identity, dense_key

    keys = [dense_key(dense_identity(compose_config(tmp_path, [f"experiment={e}", "seed=3"]))) for e in (first, second)]
    assert keys[0] == keys[1]
    other = compose_config(tmp_path, [f"experiment={second}", "seed=3", "pretrain.epochs=1"])
    assert dense_key(dense_identity(other)) != keys[0]  # the key does see the recipe
