"""MaskSet: selection, the zero-mask invariant under every optimiser, persistence."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from prunelab.models import build_model
from prunelab.pipeline.module import PruneModule
from prunelab.pruning.masks import MaskSet, prunable_parameters, sparsity_from_options


def random_masks(model: nn.Module, density: float = 0.5, seed: int = 0) -> MaskSet:
    g = torch.Generator().manual_seed(seed)
    ms = MaskSet.from_model(model)
    return MaskSet({n: torch.rand(m.shape, generator=g) < density for n, m in ms.items()})


def test_selection_options():
    model = build_model("lenet5_caffe", (1, 28, 28), 10)
    names = prunable_parameters(model)
    assert names == ["features.0.weight", "features.3.weight", "classifier.1.weight", "classifier.3.weight"]
    assert prunable_parameters(model, exclude_first=True, exclude_last=True) == names[1:-1]
    assert prunable_parameters(model, include=["linear"]) == names[2:]
    assert prunable_parameters(model, exclude=["features.*"]) == names[2:]
    with pytest.raises(ValueError, match="allowed values"):
        prunable_parameters(model, include=["bn"])


def test_sparsity_options():
    assert sparsity_from_options(0.9, None) == 0.9
    assert sparsity_from_options(None, 10) == pytest.approx(0.9)
    assert sparsity_from_options(None, 1) == 0.0
    for bad in [(1.0, None), (None, 0.99), (0.5, 2), (None, None)]:
        with pytest.raises(ValueError):
            sparsity_from_options(*bad)


@pytest.mark.parametrize(
    "opt",
    [
        {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True},
        {"name": "adam", "lr": 1e-2, "weight_decay": 1e-3},
        {"name": "adamw", "lr": 1e-2, "weight_decay": 1e-2},
    ],
)
def test_pruned_weights_stay_zero_through_training(opt):
    torch.manual_seed(0)
    model = build_model("lenet5", (1, 16, 16), 4)
    masks = random_masks(model, 0.3)
    # Weights are NOT pre-zeroed: the module must enforce the masks itself, from the first step on.
    x, y = torch.randn(64, 1, 16, 16), torch.randint(0, 4, (64,))
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    module = PruneModule(model, 4, opt, {"name": "cosine"}, stage="finetune", masks=masks)
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    before = {n: model.get_parameter(n).detach().clone() for n in masks}
    trainer.fit(module, loader)
    for n, m in masks.items():
        w = model.get_parameter(n).detach()
        assert torch.all(w[~m] == 0), n
        assert not torch.equal(w[m], before[n][m]), f"{n}: kept weights did not train"
    # and the optimiser state of pruned weights is zero too (gradients were masked before every step)
    state = trainer.optimizers[0].state
    for n, m in masks.items():
        st = state[model.get_parameter(n)]
        buf = st.get("momentum_buffer", st.get("exp_avg"))
        assert torch.all(buf[~m] == 0)


def test_mask_apply_is_one_fused_multiply():
    model = build_model("lenet_300_100", (1, 28, 28), 10)
    masks = random_masks(model, 0.1)
    masks.apply(model)
    for n, m in masks.items():
        w = model.get_parameter(n)
        assert torch.all(w[~m] == 0) and torch.count_nonzero(w) <= int(m.sum())
    assert masks.sparsity() == pytest.approx(0.9, abs=0.01)
    assert masks.compression() == pytest.approx(1 / (1 - masks.sparsity()))


def test_state_dict_roundtrip_and_digest():
    model = build_model("lenet_300_100", (1, 28, 28), 10)
    masks = random_masks(model)
    restored = MaskSet.from_state_dict(masks.state_dict())
    assert restored.equal(masks) and restored.digest() == masks.digest()
    other = random_masks(model, seed=1)
    assert other.digest() != masks.digest()


def test_masks_saved_in_checkpoint(tmp_path):
    model = build_model("lenet_300_100", (1, 8, 8), 4)
    masks = random_masks(model)
    module = PruneModule(model, 4, {"name": "sgd", "lr": 0.1}, {"name": "constant"}, masks=masks)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 4, (32,))
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=8))
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    fresh = PruneModule(build_model("lenet_300_100", (1, 8, 8), 4), 4, {"name": "sgd"}, {"name": "constant"})
    fresh.on_load_checkpoint(torch.load(path, weights_only=False))
    assert fresh.masks.equal(masks)
