"""``accel.*`` (prunelab.training.accel): channels-last and torch.compile change how fast a stage trains, not what
it computes: the same weights up to float rounding, pruned weights exactly zero, the model handed back uncompiled
with its state-dict keys unchanged; bad values refused at start-up naming the option."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from prunelab.data import SyntheticDataModule
from prunelab.errors import UserError
from prunelab.models import build_model
from prunelab.pipeline.module import PruneModule
from prunelab.pipeline.run import build_context, validate
from prunelab.pruning.masks import MaskSet
from prunelab.training.hooks import TrainHook

_SEEN: list[torch.Tensor] = []  # the training inputs the model received (channels-last check)


def _fit(tmp_path, model_name: str, accel: dict, shape=(1, 16, 16)):
    _SEEN.clear()
    torch.manual_seed(0)
    dm = SyntheticDataModule(data_dir=str(tmp_path), input_shape=list(shape), num_classes=4, num_train=256,
                             batch_size=32)
    model = build_model(model_name, shape, 4)
    g = torch.Generator().manual_seed(1)
    masks = MaskSet({n: torch.rand(m.shape, generator=g) > 0.5 for n, m in MaskSet.from_model(model).items()})
    keys = list(model.state_dict())
    model.register_forward_pre_hook(lambda mod, args: _SEEN.append(args[0]) if mod.training else None)
    module = PruneModule(model, 4, {"name": "sgd", "lr": 0.05, "momentum": 0.9}, {"name": "cosine"},
                         masks=masks, accel=accel)
    pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0).fit(module, datamodule=dm)
    assert list(model.state_dict()) == keys
    for n, m in masks.items():
        assert not dict(model.named_parameters())[n][~m.bool()].any(), n  # pruned weights exactly zero
    return model


@pytest.mark.parametrize("model_name,accel", [
    ("lenet5", {"channels_last": True}),
    ("lenet_300_100", {"compile": True, "compile_backend": "aot_eager"}),
    ("lenet5", {"compile": True, "compile_backend": "aot_eager", "channels_last": True}),
])
def test_accel_options_train_the_same_model(tmp_path, model_name, accel):
    plain = _fit(tmp_path / "plain", model_name, {})
    fast = _fit(tmp_path / "fast", model_name, accel)
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    assert getattr(fast, "_compiled_call_impl", None) is None  # handed back uncompiled
    if accel.get("channels_last"):
        conv = next(p for p in fast.parameters() if p.dim() == 4)
        assert conv.is_contiguous(memory_format=torch.channels_last)
        assert _SEEN and all(x.is_contiguous(memory_format=torch.channels_last) for x in _SEEN)


@pytest.mark.parametrize("override,match", [
    ("accel.compile_mode=fastest", r"accel.compile_mode='fastest': allowed values: null, default, reduce-overhead"),
    ("accel.compile_backend=nope", r"accel.compile_backend='nope': allowed values: .*inductor"),
])
def test_bad_accel_options_are_refused_at_start_up(make_cfg, override, match):
    with pytest.raises(UserError, match=match):
        validate(make_cfg(override))


class _Fails(TrainHook):
    def after_step(self, module, batch_idx: int) -> None:
        raise RuntimeError("simulated failure mid-stage")


def test_a_stage_that_raises_hands_the_model_back_uncompiled(make_cfg, tmp_path):
    ctx = build_context(make_cfg("accel.compile=true", "accel.compile_backend=eager"))
    model = ctx.build_model()
    module = ctx.module(model, "pretrain", ctx.cfg.pretrain.optimizer, ctx.cfg.pretrain.scheduler, hook=_Fails())
    with pytest.raises(RuntimeError, match="simulated failure"):
        ctx.fit(module, 1, tmp_path / "ckpt")
    assert getattr(model, "_compiled_call_impl", None) is None
