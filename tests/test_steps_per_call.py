"""``data.steps_per_call``: k training batches per Lightning step (prunelab.data.batched.Chunk), k optimiser steps
in order. A single-process fit must be the fit of one batch per call, step for step: the same weights bit for bit
(plain, masked, augmented), the same LR schedule, the same hook calls with the same batch indices, the same early
stop, and the same logged rows at the same logger steps."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from omegaconf import OmegaConf

from prunelab.data import DigitsDataModule, SyntheticDataModule
from prunelab.data.batched import BatchIndexDataset, Chunk, steps_per_call
from prunelab.errors import UserError
from prunelab.models import build_model
from prunelab.pipeline.checks import check_target_options
from prunelab.pipeline.loggers import CSVLogger
from prunelab.pipeline.module import PruneModule
from prunelab.pruning.masks import MaskSet
from prunelab.training.hooks import TrainHook


def _trainer(**over):
    base = dict(lightning_module=SimpleNamespace(takes_chunks=True), limit_train_batches=1.0, max_steps=-1, val_check_interval=1.0, overfit_batches=0.0,
                fast_dev_run=False, accumulate_grad_batches=1, world_size=1, log_every_n_steps=10)
    return SimpleNamespace(**{**base, **over})


def test_steps_per_call_is_one_where_lightning_counts_batches():
    assert steps_per_call(10, _trainer()) == 10
    assert steps_per_call(8, _trainer()) == 8
    assert steps_per_call(8, None) == 1
    for over in ({"limit_train_batches": 20}, {"limit_train_batches": 0.5}, {"limit_train_batches": 1},
                 {"max_steps": 100}, {"val_check_interval": 0.25}, {"val_check_interval": 50},
                 {"overfit_batches": 2}, {"fast_dev_run": True}, {"accumulate_grad_batches": 2},
                 {"world_size": 2}, {"lightning_module": pl.LightningModule()}):
        assert steps_per_call(8, _trainer(**over)) == 1, over


def test_chunks_are_the_batches_of_the_epoch_in_order():
    x = torch.arange(103 * 3, dtype=torch.float32).reshape(103, 3)
    y = torch.arange(103)
    one = BatchIndexDataset(x, y, 10, shuffle=True, drop_last=True, seed=4)
    four = BatchIndexDataset(x, y, 10, shuffle=True, drop_last=True, seed=4, chunk=4)
    for epoch in (0, 3):
        one.set_epoch(epoch), four.set_epoch(epoch)
        assert len(one) == 10 and len(four) == 3 and four.num_batches == 10
        served = []
        for i in range(len(four)):
            c = four[i]
            assert isinstance(c, Chunk) and c.start == 4 * i and c.x.shape[1:] == (10, 3)
            served += [(c.x[j], c.y[j]) for j in range(len(c.x))]
        assert [len(c) for c in (four[0].x, four[1].x, four[2].x)] == [4, 4, 2]
        assert len(served) == 10
        for (xa, ya), (xb, yb) in zip((one[i] for i in range(len(one))), served):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    with pytest.raises(ValueError, match="drop_last"):
        BatchIndexDataset(x, y, 10, shuffle=False, drop_last=False, chunk=2)


class Recorder(TrainHook):
    """Records every (batch index, global step) a step reports; asks to stop after ``stop_after`` steps."""

    def __init__(self, stop_after: int | None = None):
        self.seen: list[tuple[int, int]] = []
        self.stop_after = stop_after

    def after_step(self, module, batch_idx: int) -> None:
        self.seen.append((batch_idx, int(module.trainer.global_step)))

    def should_stop(self) -> bool:
        return self.stop_after is not None and len(self.seen) >= self.stop_after


def _fit(tmp_path, k: int, *, dm_cls=SyntheticDataModule, masked=False, hook=None, epochs=2, logger=False,
         scheduler="cosine"):
    torch.manual_seed(0)
    if dm_cls is SyntheticDataModule:
        dm = SyntheticDataModule(data_dir=str(tmp_path), input_shape=[1, 8, 8], num_classes=4, num_train=500,
                                 batch_size=16, steps_per_call=k)
        shape = (1, 8, 8)
    else:  # digits: 8x8 images, random-crop augmentation on the device
        dm = DigitsDataModule(data_dir=str(tmp_path), batch_size=32, augment=True, steps_per_call=k)
        shape = (1, 8, 8)
    model = build_model("lenet_300_100", shape, 10 if dm_cls is DigitsDataModule else 4)
    masks = None
    if masked:
        masks = MaskSet.from_model(model)
        g = torch.Generator().manual_seed(1)
        masks = MaskSet({n: torch.rand(m.shape, generator=g) > 0.7 for n, m in masks.items()})
    module = PruneModule(model, 10 if dm_cls is DigitsDataModule else 4,
                         {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
                         {"name": scheduler}, masks=masks, hook=hook)
    log = CSVLogger(save_dir=str(tmp_path / f"csv{k}"), name="", version="") if logger else False
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=log, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         log_every_n_steps=10)
    trainer.fit(module, datamodule=dm)
    return model, module, trainer


@pytest.mark.parametrize("case", ["plain", "masked", "augmented"])
def test_a_fit_with_chunks_is_the_fit_with_one_batch_per_call(tmp_path, case):
    kw = {"masked": case == "masked", "dm_cls": DigitsDataModule if case == "augmented" else SyntheticDataModule}
    a, ma, ta = _fit(tmp_path / "a", 1, **kw)
    b, mb, tb = _fit(tmp_path / "b", 8, **kw)  # 28 batches per epoch: calls of 8, 8, 8, 4
    assert ta.train_dataloader.dataset.chunk == 1 and tb.train_dataloader.dataset.chunk == 8
    assert len(tb.train_dataloader) < len(ta.train_dataloader)  # fewer Lightning steps
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    assert ta.global_step == tb.global_step == ma.total_steps() == mb.total_steps()
    assert ta.fit_loop.epoch_loop._batches_that_stepped == tb.fit_loop.epoch_loop._batches_that_stepped
    assert ma.lr_schedulers().last_epoch == mb.lr_schedulers().last_epoch == ta.global_step
    assert ma.optimizers().param_groups[0]["lr"] == mb.optimizers().param_groups[0]["lr"]
    if case == "masked":
        for n, m in mb.masks.items():
            assert not dict(b.named_parameters())[n][~m].any()


def test_hooks_see_every_batch_index_and_stop_at_the_same_step(tmp_path):
    ra, rb = Recorder(), Recorder()
    _fit(tmp_path / "a", 1, hook=ra)
    _fit(tmp_path / "b", 8, hook=rb)
    assert ra.seen == rb.seen and len(ra.seen) == 2 * (450 // 16)
    assert [i for i, _ in ra.seen[:28]] == list(range(28))
    sa, sb = Recorder(stop_after=13), Recorder(stop_after=13)  # mid-chunk
    a, _, ta = _fit(tmp_path / "c", 1, hook=sa)
    b, _, tb = _fit(tmp_path / "d", 8, hook=sb)
    assert sa.seen == sb.seen and len(sb.seen) == 13 and ta.global_step == tb.global_step == 13
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("k", [3, 8, 10])
def test_the_logs_are_the_same_rows_at_the_same_steps(tmp_path, k):
    _fit(tmp_path, 1, logger=True, epochs=3)
    _fit(tmp_path, k, logger=True, epochs=3)  # log_every_n_steps=10: a step-level row inside calls and at their ends
    rows = [list(csv.DictReader(open(tmp_path / f"csv{j}" / "metrics.csv"))) for j in (1, k)]
    assert rows[0] == rows[1]
    assert any(r.get("pretrain/train/loss_step") for r in rows[0])  # step-level rows are there


def test_steps_per_call_is_checked_and_out_of_the_run_identity(make_cfg):
    from prunelab.config import identity

    with pytest.raises(ValueError, match="steps_per_call"):
        SyntheticDataModule(steps_per_call=0)
    assert identity(make_cfg("data.steps_per_call=3")) == identity(make_cfg("data.steps_per_call=10"))
    assert identity(make_cfg("data.batch_size=3")) != identity(make_cfg("data.batch_size=10"))


def test_option_checks_follow_kwargs_up_to_the_base_constructor():
    node = OmegaConf.create({"_target_": "prunelab.data.SyntheticDataModule", "batch_size": 8, "num_train": 100,
                             "steps_per_call": 4, "augment": False})
    check_target_options("data", node, SyntheticDataModule)
    with pytest.raises(UserError, match=r"data.bogus is not an option.*allowed options: .*batch_size"):
        check_target_options("data", OmegaConf.create({"_target_": "x", "bogus": 1}), SyntheticDataModule)
    with pytest.raises(UserError, match=r"data.batch_size='a'"):
        check_target_options("data", OmegaConf.create({"_target_": "x", "batch_size": "a"}), DigitsDataModule)
