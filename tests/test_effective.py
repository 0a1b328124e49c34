"""Effective sparsity (Vysogorets & Kempe 2023): a kept weight is effective iff it lies on an input -> output
path. Properties checked against exact references (boolean reachability for MLPs, hand-built cases for
convolutions, padding, pooling and residual blocks) and against an un-hooked float64 computation on deep
nets at high sparsity (no underflow/overflow)."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from torch import nn

from prunelab.models import build_model
from prunelab.pruning.effective import (
    EffectiveSparsity,
    _replace_modules,
    effective_masks,
    effective_sparsity_report,
)
from prunelab.pruning.masks import MaskSet


@functools.cache
def _cached_model(name: str, shape: tuple[int, int, int], kw: tuple) -> nn.Module:
    """Registry model shared by tests that only read it (effective sparsity never modifies the model)."""
    torch.manual_seed(0)
    return build_model(name, shape, 10, **dict(kw))


def _random_masks(masks: MaskSet, density: float, seed: int = 0) -> MaskSet:
    g = torch.Generator().manual_seed(seed)
    return MaskSet({n: torch.rand(m.shape, generator=g) < density for n, m in masks.items()})


def _mlp_reference(masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Exact reachability for a chain of linear layers (weights [out, in]) with boolean matrix products."""
    fwd = [torch.ones(masks[0].shape[1], dtype=torch.bool)]
    for m in masks:
        fwd.append((m.double() @ fwd[-1].double()) > 0)
    bwd = [torch.ones(masks[-1].shape[0], dtype=torch.bool)]
    for m in reversed(masks):
        bwd.append((m.double().T @ bwd[-1].double()) > 0)
    bwd = bwd[::-1]
    return [m & fwd[i][None, :] & bwd[i + 1][:, None] for i, m in enumerate(masks)]


def _plain_float64_reference(model: nn.Module, masks, input_shape) -> tuple[dict[str, torch.Tensor], float]:
    """Same linearisation, but plain float64 autograd without any binarising hook; also returns the largest
    output value."""
    net = copy.deepcopy(model).double()
    _replace_modules(net)
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.weight = nn.Parameter(torch.ones_like(m.weight), requires_grad=False)
            m.bias = None
    params = []
    for n, mask in masks.items():
        prefix, _, attr = n.rpartition(".")
        setattr(net.get_submodule(prefix), attr, nn.Parameter(mask.double()))
        params.append(net.get_parameter(n))
    out = net.eval()(torch.ones(1, *input_shape, dtype=torch.float64))
    assert torch.isfinite(out).all()
    grads = torch.autograd.grad(out.sum(), params, allow_unused=True)
    eff = {
        n: masks[n] & (g > 0) if g is not None else torch.zeros_like(masks[n]) for n, g in zip(masks, grads)
    }
    return eff, float(out.max())


def _equal(a, b) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# --- dense networks ----------------------------------------------------------------------------------------
DENSE_CASES = [
    ("lenet_300_100", (1, 8, 8), {}),
    ("mlp", (1, 8, 8), {"hidden": (16, 8)}),
    ("lenet5", (1, 16, 16), {}),
    ("vgg11", (3, 32, 32), {"width": 0.125}),
    ("vgg16", (3, 32, 32), {"width": 0.125}),
    ("vgg19", (3, 32, 32), {"width": 0.125}),
    ("resnet18", (3, 16, 16), {}),  # resnet34: same torchvision BasicBlock code, left out to save time
    ("resnet50", (3, 16, 16), {}),
    ("resnet20", (3, 16, 16), {"width": 4}),
    ("resnet56", (3, 16, 16), {"width": 4}),
    ("timm", (3, 64, 64), {"arch": "resnet10t"}),  # layer4 at 2x2: no padding-only taps
]


@pytest.mark.parametrize("name,shape,kw", DENSE_CASES, ids=[c[0] for c in DENSE_CASES])
def test_dense_network_has_zero_effective_sparsity(name, shape, kw):
    torch.manual_seed(0)
    model = _cached_model(name, shape, tuple(sorted(kw.items())))
    masks = MaskSet.from_model(model)
    rep = effective_sparsity_report(model, masks, shape)
    assert rep["sparsity_direct"] == 0.0
    assert rep["sparsity_effective"] == 0.0
    assert rep["compression_effective"] == 1.0
    assert rep["layer_collapse"] is False
    assert all(lay["effective_remaining"] == lay["numel"] for lay in rep["layers"])


def test_vgg_on_tiny_input_loses_padding_only_taps():
    # VGG-11 on 16x16: the last conv layers run on 1x1 maps, where only the centre tap ever sees a pixel.
    torch.manual_seed(0)
    model = build_model("vgg11", (3, 16, 16), 10, width=0.125)
    masks = MaskSet.from_model(model)
    eff = effective_masks(model, masks, (3, 16, 16))
    convs = [n for n in masks if masks[n].dim() == 4]
    last = eff[convs[-1]]
    assert last[:, :, 1, 1].all() and int(last.sum()) == last.shape[0] * last.shape[1]
    assert eff[convs[0]].all()  # the first conv runs on 16x16: every tap is used


# --- MLPs: exact boolean reference -------------------------------------------------------------------------
def _mlp():
    torch.manual_seed(0)
    return build_model("mlp", (1, 4, 4), 5, hidden=(8, 6))


def test_mlp_unit_without_outgoing_weights_deactivates_its_incoming_weights():
    model = _mlp()
    masks = MaskSet.from_model(model)  # 1.weight [8,16], 3.weight [6,8], 5.weight [5,6]
    m = {k: v.clone() for k, v in masks.items()}
    m["3.weight"][:, 2] = False  # hidden unit 2 of layer 1 has no outgoing weight
    eff = effective_masks(model, m, (1, 4, 4))
    expected_first = torch.ones(8, 16, dtype=torch.bool)
    expected_first[2] = False
    assert torch.equal(eff["1.weight"], expected_first)
    assert torch.equal(eff["3.weight"], m["3.weight"])
    assert eff["5.weight"].all()


def test_mlp_unit_without_incoming_weights_deactivates_its_outgoing_weights():
    model = _mlp()
    m = {k: v.clone() for k, v in MaskSet.from_model(model).items()}
    m["3.weight"][4, :] = False  # hidden unit 4 of layer 2 receives nothing
    eff = effective_masks(model, m, (1, 4, 4))
    expected_last = torch.ones(5, 6, dtype=torch.bool)
    expected_last[:, 4] = False
    assert torch.equal(eff["5.weight"], expected_last)
    assert eff["1.weight"].all()
    assert torch.equal(eff["3.weight"], m["3.weight"])


@pytest.mark.parametrize("density", [0.5, 0.2, 0.1])
def test_mlp_random_masks_match_boolean_reachability(density):
    model = _mlp()
    masks = _random_masks(MaskSet.from_model(model), density, seed=int(density * 100))
    eff = effective_masks(model, masks, (1, 4, 4))
    ref = _mlp_reference([masks[n] for n in masks])
    for n, r in zip(masks, ref):
        assert torch.equal(eff[n], r), n


def test_layer_collapse_reports_infinite_compression():
    model = _mlp()
    m = {k: v.clone() for k, v in MaskSet.from_model(model).items()}
    m["3.weight"][:] = False
    rep = effective_sparsity_report(model, m, (1, 4, 4))
    assert rep["layer_collapse"] is True
    assert rep["sparsity_effective"] == 1.0
    assert rep["compression_effective"] == math.inf
    assert all(lay["effective_remaining"] == 0 for lay in rep["layers"])


def test_unmasked_layers_count_as_dense_and_are_not_reported():
    model = _mlp()
    masks = MaskSet.from_model(model, exclude_first=True)
    m = {k: v.clone() for k, v in masks.items()}
    m["3.weight"][:, 0] = False
    eff = effective_masks(model, m, (1, 4, 4))
    assert set(eff) == {"3.weight", "5.weight"}
    assert torch.equal(eff["3.weight"], m["3.weight"]) and eff["5.weight"].all()


# --- convolutions ------------------------------------------------------------------------------------------
def _convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(5 * 2 * 2, 3),
    )


def test_conv_channel_cut_downstream_deactivates_the_channel_filter():
    model = _convnet()
    m = {k: v.clone() for k, v in MaskSet.from_model(model).items()}
    m["3.weight"][:, 1] = False  # channel 1 of the first conv feeds nothing
    eff = effective_masks(model, m, (2, 4, 4))
    expected = torch.ones(4, 2, 3, 3, dtype=torch.bool)
    expected[1] = False
    assert torch.equal(eff["0.weight"], expected)
    assert torch.equal(eff["3.weight"], m["3.weight"]) and eff["7.weight"].all()


def test_conv_channel_cut_upstream_deactivates_the_channel_outputs():
    model = _convnet()
    m = {k: v.clone() for k, v in MaskSet.from_model(model).items()}
    m["0.weight"][2] = False  # channel 2 of the first conv receives nothing (its bias does not count)
    eff = effective_masks(model, m, (2, 4, 4))
    expected = torch.ones(5, 4, 3, 3, dtype=torch.bool)
    expected[:, 2] = False
    assert torch.equal(eff["3.weight"], expected)
    assert torch.equal(eff["0.weight"], m["0.weight"]) and eff["7.weight"].all()


def test_classifier_cut_after_flatten_deactivates_exactly_that_channel():
    model = _convnet()
    m = {k: v.clone() for k, v in MaskSet.from_model(model).items()}
    m["7.weight"][:, 4 * 3 : 4 * 4] = False  # flatten order (C, H, W): channel 3 of the second conv
    eff = effective_masks(model, m, (2, 4, 4))
    expected = torch.ones(5, 4, 3, 3, dtype=torch.bool)
    expected[3] = False
    assert torch.equal(eff["3.weight"], expected)
    assert eff["0.weight"].all()


def test_kernel_tap_that_only_sees_padding_is_inactive():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2, 1))
    masks = MaskSet.from_model(model)
    eff = effective_masks(model, masks, (1, 1, 1))
    expected = torch.zeros(2, 1, 3, 3, dtype=torch.bool)
    expected[:, :, 1, 1] = True
    assert torch.equal(eff["0.weight"], expected)
    # on a 2x2 input every tap of a padded 3x3 kernel touches a pixel
    model2 = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(8, 1))
    assert effective_masks(model2, MaskSet.from_model(model2), (1, 2, 2))["0.weight"].all()


def test_maxpool_connects_every_window_input():
    # A 2x2 conv with padding 1 on a 1x1 input: each of the 4 output pixels uses a different tap; a 2x2
    # max-pool joins them. A real max-pool backward would route the gradient to one tap only.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 1, 2, padding=1), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(1, 1))
    eff = effective_masks(model, MaskSet.from_model(model), (1, 1, 1))
    assert eff["0.weight"].all()
    model = nn.Sequential(
        nn.Conv2d(1, 1, 2, padding=1), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(1, 1)
    )
    assert effective_masks(model, MaskSet.from_model(model), (1, 1, 1))["0.weight"].all()


# --- residual networks -------------------------------------------------------------------------------------
def test_residual_branch_pruned_skip_keeps_the_network_connected():
    model = _cached_model("resnet18", (3, 16, 16), ())
    masks = MaskSet.from_model(model)
    m = {k: v.clone() for k, v in masks.items()}
    m["layer1.0.conv1.weight"][:] = False
    rep = effective_sparsity_report(model, m, (3, 16, 16))
    eff_layers = {lay["name"]: lay for lay in rep["layers"]}
    assert rep["layer_collapse"] is False
    assert eff_layers["layer1.0.conv2.weight"]["effective_remaining"] == 0  # its only input is gone
    for n, lay in eff_layers.items():
        if n not in ("layer1.0.conv1.weight", "layer1.0.conv2.weight"):
            assert lay["effective_remaining"] == lay["numel"], n


def test_residual_downsample_shortcut_is_a_path():
    torch.manual_seed(0)
    model = build_model("resnet20", (3, 8, 8), 10, width=4)
    m = {k: v.clone() for k, v in MaskSet.from_model(model).items()}
    m["layer2.0.conv2.weight"][:] = False  # the branch of the first stage-2 block ends nowhere
    eff = effective_masks(model, m, (3, 8, 8))
    assert not eff["layer2.0.conv1.weight"].any() and not eff["layer2.0.conv2.weight"].any()
    assert eff["layer2.0.downsample.0.weight"].all()
    assert (
        eff["layer1.0.conv1.weight"].all() and eff["layer3.2.conv2.weight"].all() and eff["fc.weight"].all()
    )
    # cutting the shortcut as well disconnects everything
    m["layer2.0.downsample.0.weight"][:] = False
    rep = effective_sparsity_report(model, m, (3, 8, 8))
    assert rep["layer_collapse"] is True and rep["effective_remaining"] == 0


# --- numerics on deep nets ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,shape,kw,density",
    [
        ("vgg19", (3, 32, 32), {"width": 0.25}, 0.02),
        ("vgg19", (3, 32, 32), {"width": 0.25}, 1.0),
        ("resnet50", (3, 8, 8), {}, 0.01),
    ],
)
def test_deep_nets_float32_hooks_match_float64_reference(name, shape, kw, density):
    # the ResNet-50 built for 16x16 (CIFAR stem, shared with the dense test) is evaluated on 8x8 inputs
    model = _cached_model(name, (3, 16, 16) if name == "resnet50" else shape, tuple(sorted(kw.items())))
    masks = _random_masks(MaskSet.from_model(model), density, seed=1)
    eff32 = EffectiveSparsity(model, shape, torch.float32)(masks)
    eff64 = EffectiveSparsity(model, shape, torch.float64)(masks)
    assert _equal(eff32, eff64)
    if name == "vgg19":
        reference, out_max = _plain_float64_reference(model, masks, shape)
        assert _equal(eff32, reference)
        if density == 1.0:  # without the binarising hooks the dense VGG-19 would overflow float32 (~1e43)
            assert out_max > torch.finfo(torch.float32).max
    removed = sum(int(masks[n].sum() - eff32[n].sum()) for n in masks)
    if density < 1.0:
        assert removed > 0  # high sparsity disconnects some weights: the comparison is not trivial


def test_model_is_not_modified_and_evaluator_is_reusable():
    torch.manual_seed(0)
    model = build_model("lenet5", (1, 16, 16), 10)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = MaskSet.from_model(model)
    ev = EffectiveSparsity(model, (1, 16, 16))
    sparse = _random_masks(masks, 0.05)
    first = ev(sparse)
    assert _equal(ev(masks), {n: torch.ones_like(v) for n, v in masks.items()})
    assert _equal(ev(sparse), first)  # no state leaks from one call to the next
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.dtype == torch.float32 for p in model.parameters())
