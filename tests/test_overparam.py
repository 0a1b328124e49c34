"""Linear over-parameterization (Qian et al. 2022, arXiv 2204.11444): exact expansion, exact merge."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from prunelab.finetune.overparam import (
    ExpandedConv2d,
    ExpandedLinear,
    count_params,
    expand_model,
    expandable_modules,
    merge_model,
    remask,
)

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return _max_err(a, b) / max(1.0, b.abs().max().item())


# ------------------------------------------------------------------------------------- init exactness
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("same_pad", [False, True])
def test_conv_block_equals_conv_at_init(k: int, stride: int, same_pad: bool, bias: bool, dtype) -> None:
    torch.manual_seed(k * 100 + stride * 10 + same_pad)
    conv = nn.Conv2d(3, 5, k, stride=stride, padding=k // 2 if same_pad else 0, bias=bias).to(dtype)
    if bias:
        nn.init.normal_(conv.bias)
    block = ExpandedConv2d.from_conv(conv, ratio=4)
    x = torch.randn(2, 3, 9, 9, dtype=dtype)
    y = conv(x)
    out = block(x)
    assert out.shape == y.shape and out.dtype == dtype
    assert _max_err(out, y) < TOL[dtype]
    # the factor shapes of the paper: m -> r m -> r n -> n, padding on the first 1x1, stride on the k x k
    assert block.first.weight.shape == (12, 3, 1, 1) and block.first.bias is None
    assert block.middle.weight.shape == (20, 12, k, k) and block.middle.stride == (stride, stride)
    assert block.first.padding == conv.padding and block.middle.padding == (0, 0)
    assert block.last.weight.shape == (5, 20, 1, 1) and (block.last.bias is not None) == bias
    merged = block.merge()
    assert _max_err(merged.weight, conv.weight) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_block_equals_linear_at_init(bias: bool, dtype) -> None:
    torch.manual_seed(1)
    lin = nn.Linear(7, 4, bias=bias).to(dtype)
    block = ExpandedLinear.from_linear(lin, ratio=3)
    x = torch.randn(5, 7, dtype=dtype)
    assert [m.weight.shape for m in (block.first, block.middle, block.last)] == [(21, 7), (12, 21), (4, 12)]
    assert _max_err(block(x), lin(x)) < TOL[dtype]


def test_init_is_not_a_zero_padded_identity() -> None:
    """Full-rank random outer factors; the middle kernel has no dead rows/columns."""
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 6, 3, padding=1).double()
    block = ExpandedConv2d.from_conv(conv, ratio=4)
    a = block.first.weight[:, :, 0, 0]
    c = block.last.weight[:, :, 0, 0]
    assert torch.linalg.matrix_rank(a) == 4 and torch.linalg.matrix_rank(c) == 6
    assert (a.abs() > 1e-6).float().mean() > 0.9  # dense, not [I; 0]
    w2 = block.middle.weight.reshape(24, 16, 9)
    assert (w2.abs().sum(dim=(1, 2)) > 1e-6).all() and (w2.abs().sum(dim=(0, 2)) > 1e-6).all()


def test_generator_makes_expansion_reproducible() -> None:
    conv = nn.Conv2d(2, 3, 3)
    b1 = ExpandedConv2d.from_conv(conv, 2, generator=torch.Generator().manual_seed(7))
    b2 = ExpandedConv2d.from_conv(conv, 2, generator=torch.Generator().manual_seed(7))
    b3 = ExpandedConv2d.from_conv(conv, 2, generator=torch.Generator().manual_seed(8))
    assert torch.equal(b1.first.weight, b2.first.weight) and torch.equal(b1.middle.weight, b2.middle.weight)
    assert not torch.equal(b1.first.weight, b3.first.weight)


def test_reflect_padding_is_preserved() -> None:
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect").double()
    block = ExpandedConv2d.from_conv(conv, 2)
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    assert _max_err(block(x), conv(x)) < 1e-10
    assert _max_err(block.merge()(x), conv(x)) < 1e-10


# ------------------------------------------------------------------------------ padding placement
def _padding_on_middle(block: ExpandedConv2d) -> nn.Sequential:
    """The WRONG placement: first 1x1 unpadded, the padding moved onto the k x k conv."""
    first = nn.Conv2d(block.first.in_channels, block.first.out_channels, 1, bias=block.first.bias is not None)
    middle = nn.Conv2d(block.middle.in_channels, block.middle.out_channels, block.middle.kernel_size,
                       stride=block.middle.stride, padding=block.first.padding, bias=block.middle.bias is not None)
    wrong = nn.Sequential(first, middle, copy.deepcopy(block.last)).double()
    wrong[0].load_state_dict(block.first.state_dict())
    wrong[1].load_state_dict(block.middle.state_dict())
    return wrong


def test_padding_on_first_factor_keeps_borders_exact() -> None:
    """With a (trained) bias on the first factor, only the padding on the first 1x1 gives a block that one
    conv (the merge) reproduces at the borders; padding on the k x k differs exactly at the borders."""
    torch.manual_seed(4)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    block = ExpandedConv2d.from_conv(conv, ratio=2, bias_first=True, bias_middle=True)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    wrong = _padding_on_middle(block)
    assert _max_err(wrong(x), block(x)) < 1e-10  # b1 = 0 at init: both placements agree
    with torch.no_grad():
        block.first.bias.normal_()
        block.middle.bias.normal_()
    wrong = _padding_on_middle(block)
    merged = block.merge()
    y_ok, y_wrong, y_merged = block(x), wrong(x), merged(x)
    assert _max_err(y_ok, y_merged) < 1e-10
    interior = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    assert _max_err(y_wrong[interior], y_merged[interior]) < 1e-10
    border = (y_wrong - y_merged).abs().amax(dim=(0, 1))
    assert border[0].min() > 1e-3 and border[-1].min() > 1e-3 and border[:, 0].min() > 1e-3


# ------------------------------------------------------------------------------- train, then merge
def _train(
    block: nn.Module, x: torch.Tensor, target: torch.Tensor, opt_name: str, steps: int = 5, check: bool = True
) -> None:
    """A few optimiser steps towards a random target; on the first, every row and column of every factor
    must get a nonzero gradient (a zero-padded identity init would fail this)."""
    opt = (torch.optim.SGD(block.parameters(), lr=0.05, momentum=0.9) if opt_name == "sgd"
           else torch.optim.Adam(block.parameters(), lr=1e-2))
    for step in range(steps):
        opt.zero_grad()
        loss = (block(x) - target).pow(2).mean()
        loss.backward()
        if step == 0 and check:
            for name, p in block.named_parameters():
                g = p.grad.reshape(p.shape[0], -1) if p.dim() > 1 else p.grad[:, None]
                assert (g.abs().sum(dim=1) > 0).all(), f"{name} has rows with zero gradient"
                if p.dim() > 1:
                    assert (g.abs().sum(dim=0) > 0).all(), f"{name} has columns with zero gradient"
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
@pytest.mark.parametrize("extra_bias", [False, True])
def test_merge_after_training_equals_block_conv(dtype, opt_name: str, extra_bias: bool) -> None:
    torch.manual_seed(5)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1).to(dtype)
    block = ExpandedConv2d.from_conv(conv, ratio=3, bias_first=extra_bias, bias_middle=extra_bias)
    x = torch.randn(4, 3, 7, 7, dtype=dtype)
    _train(block, x, torch.randn_like(conv(x)), opt_name)
    merged = block.merge()
    assert isinstance(merged, nn.Conv2d) and merged.weight.shape == conv.weight.shape
    assert merged.stride == conv.stride and merged.padding == conv.padding and merged.weight.dtype == dtype
    assert _max_err(merged.weight, conv.weight) > 1e-3  # training did change the function
    x2 = torch.randn(3, 3, 9, 9, dtype=dtype)
    with torch.no_grad():
        err = _rel_err(merged(x2), block(x2))
    assert err < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("extra_bias", [False, True])
def test_merge_after_training_equals_block_linear(dtype, extra_bias: bool) -> None:
    torch.manual_seed(6)
    lin = nn.Linear(6, 3).to(dtype)
    block = ExpandedLinear.from_linear(lin, ratio=4, bias_first=extra_bias, bias_middle=extra_bias)
    x = torch.randn(8, 6, dtype=dtype)
    _train(block, x, torch.randn(8, 3, dtype=dtype), "adam")
    merged = block.merge()
    assert isinstance(merged, nn.Linear) and merged.weight.shape == (3, 6)
    assert _max_err(merged.bias, lin.bias) > 1e-3
    with torch.no_grad():
        assert _rel_err(merged(x), block(x)) < TOL[dtype]


def test_param_count_formula_and_return_to_compact() -> None:
    conv = nn.Conv2d(3, 5, 3, padding=1)
    block = ExpandedConv2d.from_conv(conv, ratio=4)
    m, n, r, k = 3, 5, 4, 3
    assert count_params(block) == r * m * m + (r * m) * (r * n) * k * k + r * n * n + n
    model = _SmallCNN()
    compact = count_params(model)
    expand_model(model, ratio=4)
    assert count_params(model) > 4 * compact
    merge_model(model)
    assert count_params(model) == compact


# ---------------------------------------------------------------------------------- whole models
class _SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
            nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),  # grouped: never expanded
            nn.MaxPool2d(2),
        )
        self.fc1 = nn.Linear(8 * 2 * 2, 16)  # for 8x8 inputs
        self.classifier = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.fc1(self.features(x).flatten(1))))


def _randomise_bn(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()


def test_expand_and_merge_small_cnn_with_batchnorm() -> None:
    torch.manual_seed(7)
    model = _SmallCNN().double()
    _randomise_bn(model)
    model.eval()
    ref_state = {k: v.shape for k, v in model.state_dict().items()}
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    y = model(x)
    names = expand_model(model, ratio=3)
    assert names == ["features.0", "features.3", "fc1"]  # classifier and grouped conv left alone
    assert isinstance(model.classifier, nn.Linear) and isinstance(model.features[6], nn.Conv2d)
    assert isinstance(model.features[0], ExpandedConv2d) and isinstance(model.fc1, ExpandedLinear)
    assert isinstance(model.features[1], nn.BatchNorm2d)
    assert not model.features[0].training  # mode of the replaced layer kept
    assert _max_err(model(x), y) < 1e-10
    assert merge_model(model) == names
    assert {k: v.shape for k, v in model.state_dict().items()} == ref_state
    assert _max_err(model(x), y) < 1e-10


def test_expand_model_selection_options() -> None:
    model = _SmallCNN()
    assert expandable_modules(model) == ["features.0", "features.3", "fc1"]
    assert expand_model(copy.deepcopy(model), layers=["fc1", "features.*"]) == ["features.0", "features.3", "fc1"]
    assert expand_model(copy.deepcopy(model), layers="auto", exclude=["features.*"]) == ["fc1"]
    assert expand_model(copy.deepcopy(model), layers=["classifier"]) == ["classifier"]
    with pytest.raises(ValueError):
        expand_model(copy.deepcopy(model), layers=["features.6"])  # grouped conv
    with pytest.raises(ValueError):
        expand_model(copy.deepcopy(model), layers=["nonexistent"])
    twice = copy.deepcopy(model)
    expand_model(twice)
    assert expand_model(twice) == []  # nothing left to expand inside the blocks
    assert merge_model(twice) == ["features.0", "features.3", "fc1"]


def test_conv_subclasses_are_not_expanded() -> None:
    class StdConv(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
            return self._conv_forward(x, w, self.bias)

    model = nn.Sequential(StdConv(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 2, 1))
    assert expand_model(model) == ["1"]


def test_resnet18_expand_merge_outputs_unchanged() -> None:
    torch.manual_seed(8)
    model = torchvision.models.resnet18(num_classes=10)
    _randomise_bn(model)
    model.eval()
    compact = count_params(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
        names = expand_model(model, ratio=2)
        assert "fc" not in names and isinstance(model.fc, nn.Linear)
        assert len(names) == 20 and "conv1" in names and "layer2.0.downsample.0" in names
        assert _rel_err(model(x), y) < 1e-4
        merge_model(model)
        assert count_params(model) == compact
        assert _rel_err(model(x), y) < 1e-4


# ------------------------------------------------------------------------------ masks, formats
def test_remask_restores_unstructured_sparsity() -> None:
    torch.manual_seed(9)
    model = _SmallCNN()
    masks = {"features.0.weight": torch.rand(6, 3, 3, 3) > 0.5, "fc1.weight": torch.rand(16, 32) > 0.7}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in masks:
                p.mul_(masks[name])
    expand_model(model)
    with pytest.raises(KeyError):
        remask(model, masks)
    x = torch.randn(4, 3, 8, 8)
    _train(model, x, torch.randn(4, 5), "sgd", steps=2, check=False)
    merge_model(model)
    w = model.features[0].weight
    assert (w[~masks["features.0.weight"]] != 0).all()  # merged weight is dense
    kept = w[masks["features.0.weight"]].clone()
    assert remask(model, masks) == list(masks)
    assert (w[~masks["features.0.weight"]] == 0).all() and torch.equal(w[masks["features.0.weight"]], kept)
    assert (model.fc1.weight[~masks["fc1.weight"]] == 0).all()
    with pytest.raises(ValueError):
        remask(model, {"fc1.weight": torch.ones(3, 3, dtype=torch.bool)})


def test_channels_last_and_dtype_preserved() -> None:
    torch.manual_seed(10)
    conv = nn.Conv2d(3, 4, 3, padding=1).double().to(memory_format=torch.channels_last)
    block = ExpandedConv2d.from_conv(conv, 2)
    assert block.middle.weight.dtype == torch.float64
    assert block.middle.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64).to(memory_format=torch.channels_last)
    assert _max_err(block(x), conv(x)) < 1e-10
    merged = block.merge()
    assert merged.weight.dtype == torch.float64
    assert merged.weight.is_contiguous(memory_format=torch.channels_last) and not merged.weight.is_contiguous()
