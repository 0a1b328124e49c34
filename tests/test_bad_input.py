"""Bad input through the real CLI: one line ``prunelab: error: <message naming the option>``, exit status 2,
no traceback, and nothing trained (no dense cache, no stage record, no claimed run folder)."""

from __future__ import annotations

from pathlib import Path

import pytest

from prunelab.cli import user_error_message
from prunelab.errors import UserError
from tests.test_cli import FAST, prunelab

DATA = [o for o in FAST if o.startswith("data.")]
# every method config, in the order Hydra lists them (a new method must not break the unknown-option case)
METHODS = ", ".join(sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "method").glob("*.yaml")))
BASE = [o for o in FAST if not o.startswith("data")]  # no data choice: the npz case picks its own

# Every case of issue 16, through the real CLI (one process each); (id, overrides, text the message must
# contain); "{tmp}" is the test's folder.
CASES = [
    ("unknown top-level key", ["+foo=1"], "foo is not a prunelab option"),
    ("top-level lr", ["lr=nan"], "lr is not a prunelab option"),
    ("misspelt key", ["prune.sparsty=0.5"], "prune.sparsty is not a prunelab option"),
    ("exclude matches nothing", ["prune.exclude=[nomatch*]"], "prune.exclude pattern 'nomatch*' matches no"),
    ("include matches nothing", ["prune.include=[conv]"], "prune.include=['conv'] selects no layer"),
    ("include unknown kind", ["prune.include=[attn]"], "prune.include=['attn']: unknown layer kind"),
    ("score_batch_size 0", ["prune.score_batch_size=0"], "prune.score_batch_size=0"),
    ("score_batches 0", ["prune.score_batches=0"], "prune.score_batches=0"),
    ("round_epochs negative", ["schedule=iterative", "schedule.round_epochs=-1"], "schedule.round_epochs=-1"),
    ("clip_grad_norm negative", ["pretrain.optimizer.clip_grad_norm=-1"], "pretrain.optimizer.clip_grad_norm"),
    ("negative finetune lr", ["finetune.optimizer.lr=-0.1"], "finetune.optimizer.lr=-0.1"),
    ("nan lr", ["pretrain.optimizer.lr=nan"], "pretrain.optimizer.lr=nan"),
    ("augment not a bool", ["data.augment=maybe"], "data.augment='maybe': must be true or false"),
    ("epochs not an int", ["finetune.epochs=abc"], "finetune.epochs='abc': must be an integer"),
    ("batch size not an int", ["data.batch_size=abc"], "data.batch_size='abc': must be an integer"),
    ("batch size 0", ["data.batch_size=0"], "data.batch_size=0: must be an integer >= 1"),
    ("method option: the real options", ["method=snip", "+method.foo=1"],
     "method.foo is not an option of method=snip (prunelab.pruning.scorers.snip.SNIPScorer); "
     "allowed options: num_batches, train_mode"),
    ("unknown group option", ["method=nope"], f"method=nope: no such option; Available options: {METHODS}"),
    ("npz not an archive", ["data=npz", "data.path={tmp}/bad.npz"], "{tmp}/bad.npz is not a .npz archive"),
    ("uncreatable run dir", ["hydra.run.dir={tmp}/file/run"], "set hydra.run.dir to a writable directory"),
]


@pytest.mark.parametrize("overrides,expected", [(o, e) for _, o, e in CASES], ids=[c[0] for c in CASES])
def test_bad_input_one_line_exit_2_nothing_trained(tmp_path, overrides, expected):
    (tmp_path / "bad.npz").write_text("not a zip archive")
    (tmp_path / "file").write_text("a file, not a folder")
    overrides = [o.format(tmp=tmp_path) for o in overrides]
    data = [] if any(o.startswith("data=") for o in overrides) else ["data=synthetic", *DATA]
    out = prunelab(tmp_path, *BASE, *data, "logger=none", *overrides)
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("prunelab: error: "), out.stderr[-3000:]
    assert expected.format(tmp=tmp_path) in last, last
    assert "Traceback" not in out.stderr + out.stdout
    # nothing trained, nothing claimed
    assert not (tmp_path / "outputs" / "cache" / "dense").exists()
    assert not list(tmp_path.glob("outputs/**/stages")) and not list(tmp_path.glob("outputs/**/run.json"))


# More of the same checks, in-process (the CLI path above prints what these raise).
IN_PROCESS = [
    (["+prune.foo=1"], "prune.foo is not a prunelab option"),
    (["+method.foo=1"], "method.foo is not an option of method=magnitude .*; allowed options: none"),
    (["allocation=uniform_plus", "+allocation.maxlast=1"], "allocation.maxlast .*allowed options: max_last"),
    (["prune.sparsity=0.5", "prune.compression=10"], "set prune.sparsity or prune.compression, not both"),
    (["trainer.precision=17"], "trainer.precision=17: must be one of"),
    (["+model.depth=3"], "model.depth is not an option of model=lenet_300_100 .*allowed options: name, "
                         "check_input, weights, hidden"),
    (["data.val_fraction=1.5"], r"data.val_fraction=1.5: must be a finite number >= 0.0 and < 1.0"),
    (["measure.repeats=0"], "measure.repeats=0: must be an integer >= 1"),
    (["pretrain.optimizer.momentum=1.5"], "pretrain.optimizer.momentum=1.5"),
    (["seed=-1"], "seed=-1: must be an integer in"),
    (["data=npz"], "data.path must be set"),
    (["data=npz", "data.path=x.npz", "data.mean=[nan]"], r"data.mean=.*must be a list of items each a number \(not nan\)"),
    # a target the method does not read: given on the command line, refused (the default 0.9 is not "given")
    (["method=bmrs_n", "schedule=bayesian", "prune.sparsity=0.5"],
     r"prune.sparsity=0.5 is ignored by method=bmrs_n: it is threshold-free .*allowed values for this method: null"),
    (["method=taylor_fo", "schedule=oneshot", "prune.compression=10"],
     r"prune.compression=10.* is ignored by method=taylor_fo: its target is method.amount"),
]


@pytest.mark.parametrize("overrides,match", IN_PROCESS)
def test_more_bad_options_refused_before_training(make_cfg, tmp_path, overrides, match):
    from prunelab.pipeline.run import run_pipeline

    fast = not any(o.startswith("data=") for o in overrides)
    with pytest.raises(UserError, match=match):
        run_pipeline(make_cfg(*overrides, fast=fast))
    assert not (tmp_path / "outputs" / "cache" / "dense").exists() and not (tmp_path / "run" / "run.json").exists()


def test_verbose_shows_the_traceback_of_a_user_error(tmp_path):
    out = prunelab(tmp_path, *FAST, "data.batch_size=0", "--verbose")
    assert out.returncode == 2
    assert "Traceback" in out.stderr and out.stderr.strip().splitlines()[-1].startswith("prunelab: error: ")


def test_user_errors_and_bugs_are_told_apart():
    from prunelab.pruning.masks import sparsity_from_options

    assert user_error_message(UserError("data.x=1: must be 2")) == "data.x=1: must be 2"
    try:
        sparsity_from_options(2.0, None)  # prunelab's own check: a user error
    except ValueError as e:
        assert user_error_message(e).startswith("prune.sparsity must be in [0, 1)")
    try:
        int("abc")  # raised here, outside prunelab: a bug, keeps its traceback
    except ValueError as e:
        assert user_error_message(e) is None
    try:
        {}["missing"]
    except KeyError as e:
        assert user_error_message(e) is None


# -- experiment overlays: validated as the CLI validates a run, not only composed ---------------------------
def _overlays() -> list[str]:
    from prunelab.cli import CONFIG_DIR

    return sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))


def _check_like_the_cli(cfg):
    from prunelab.config import apply_prune_target
    from prunelab.pipeline.run import check_options

    apply_prune_target(cfg)
    return check_options(cfg)  # validate (keys, option names, types, ranges, target) + constructors + schedule


@pytest.mark.parametrize("overlay", _overlays())
def test_every_experiment_overlay_passes_the_cli_checks(make_cfg, overlay):
    from prunelab.cli import CONFIG_DIR

    text = (Path(CONFIG_DIR) / "experiment" / f"{overlay}.yaml").read_text()
    extra = ["model.weights=/nonexistent.pth"] if "weights: ???" in text else []  # the user supplies these
    sparsity, *_ = _check_like_the_cli(make_cfg(f"experiment={overlay}", *extra, fast=False))
    assert 0 <= sparsity < 1


@pytest.mark.parametrize("typo,option", [
    ("method:\n  amout: 0.5\n", "method.amout"),            # an option name
    ("finetune:\n  epochs: ten\n", "finetune.epochs"),       # a type
    ("prune:\n  score_batches: 0\n", "prune.score_batches"),  # a range
])
def test_a_typo_in_an_overlay_fails(make_cfg, tmp_path, typo, option):
    overlay = tmp_path / "conf" / "experiment" / "typo.yaml"
    overlay.parent.mkdir(parents=True)
    overlay.write_text("# @package _global_\ndefaults:\n  - override /method: taylor_fo\n"
                       "  - override /schedule: iterative_structured\n" + typo)
    cfg = make_cfg(f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "experiment=typo", fast=False)
    with pytest.raises(UserError, match=option.replace(".", r"\.")):
        _check_like_the_cli(cfg)
