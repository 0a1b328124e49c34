"""The progress bar says which stage runs and shows metric names a reader can read."""

from __future__ import annotations

from types import SimpleNamespace

from prunelab.pipeline.progress import StageProgressBar, short_metric_name


def test_metric_names_lose_the_stage_prefix_only():
    assert short_metric_name("pretrain/train/loss_step", "pretrain") == "train/loss_step"
    assert short_metric_name("finetune/val/acc", "pretrain") == "finetune/val/acc"
    assert short_metric_name("loss", None) == "loss"


def test_descriptions_name_the_stage():
    bar = StageProgressBar()
    bar._trainer = SimpleNamespace(lightning_module=SimpleNamespace(stage="prune"))
    assert bar.test_description == "prune: testing"
    assert bar.train_description == "prune: training"
    assert bar.validation_description == "prune: validation"
    bar._trainer = None
    assert bar.test_description == "Testing"
