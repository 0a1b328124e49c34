"""The LeNet family and the MLP options against the reference codes' layer shapes (prunelab/models/lenet.py)."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from prunelab.models import build_model


def _shapes(model: nn.Module) -> list[tuple[int, ...]]:
    return [tuple(m.weight.shape) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def test_lenet5_is_the_bmrs_and_connectivity_matters_lenet5():
    # saintslab/bmrs-structured-pruning modules/classifiers.py lenet5 on 32x32 (the authors resize MNIST to 32):
    # Conv2d(1, 6, 5), Conv2d(6, 16, 5), Linear(400, 120), Linear(120, 84), Linear(84, 10), max pooling.
    ref = [(6, 1, 5, 5), (16, 6, 5, 5), (120, 400), (84, 120), (10, 84)]
    model = build_model("lenet5", (1, 32, 32), 10)
    assert _shapes(model) == ref
    assert sum(p.numel() for p in model.parameters()) == 61706  # the reference net's count (biases included)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 2
    # at MNIST's own 28x28 the flatten is 16x4x4 = 256
    assert _shapes(build_model("lenet5", (1, 28, 28), 10))[2] == (120, 256)
    # Connectivity Matters (avysogorets/effective-sparsity models.py Lenet5): the same widths, average pooling
    avg = build_model("lenet5", (3, 32, 32), 10, pool="avg")
    assert _shapes(avg) == [(6, 3, 5, 5), (16, 6, 5, 5), (120, 400), (84, 120), (10, 84)]
    assert sum(isinstance(m, nn.AvgPool2d) for m in avg.modules()) == 2
    assert not any(isinstance(m, nn.MaxPool2d) for m in avg.modules())


def test_pool_option_changes_the_function():
    torch.manual_seed(0)
    a = build_model("lenet5", (1, 28, 28), 10)
    b = build_model("lenet5", (1, 28, 28), 10, pool="avg")
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 1, 28, 28)
    assert not torch.allclose(a(x), b(x))
    with pytest.raises(ValueError, match=r"model.pool='mean'; allowed values: max, avg"):
        build_model("lenet5", (1, 28, 28), 10, pool="mean")


def test_lenet5_caffe_keeps_the_20_50_500_net():
    model = build_model("lenet5_caffe", (1, 28, 28), 10)
    assert _shapes(model) == [(20, 1, 5, 5), (50, 20, 5, 5), (500, 800), (10, 500)]
    assert sum(p.numel() for p in model.parameters()) == 431080


@pytest.mark.parametrize("activation,cls", [("relu", nn.ReLU), ("tanh", nn.Tanh)])
def test_mlp_activation(activation, cls):
    # BMRS's make_mlp: Linear - Tanh per hidden layer, a plain Linear classifier
    model = build_model("mlp", (1, 28, 28), 10, hidden=[150], activation=activation)
    acts = [m for m in model.modules() if isinstance(m, (nn.ReLU, nn.Tanh))]
    assert len(acts) == 1 and isinstance(acts[0], cls)
    assert _shapes(model) == [(150, 784), (10, 150)]
    x = torch.randn(3, 1, 28, 28)
    h = model[2](model[1](model[0](x)))
    if activation == "tanh":
        assert (h.abs() < 1).all() and (h < 0).any()  # Tanh, not a rectifier
    with pytest.raises(ValueError, match=r"model.activation='gelu'; allowed values: relu, tanh"):
        build_model("mlp", (1, 28, 28), 10, activation="gelu")


@pytest.mark.parametrize("over,shapes", [
    (["model=lenet5"], [(6, 1, 5, 5), (16, 6, 5, 5), (120, 256), (84, 120), (10, 84)]),
    (["model=lenet5_caffe"], [(20, 1, 5, 5), (50, 20, 5, 5), (500, 800), (10, 500)]),
    (["model=mlp", "model.activation=tanh", "model.hidden=[150]"], [(150, 784), (10, 150)]),
    (["experiment=bmrs_lenet5_cifar10"], [(18, 3, 5, 5), (48, 18, 5, 5), (360, 1200), (252, 360), (10, 252)]),
])
def test_model_configs(make_cfg, over, shapes):
    cfg = make_cfg(*over)
    shape = (3, 32, 32) if "cifar10" in over[0] else (1, 28, 28)
    model = instantiate(cfg.model, input_shape=shape, num_classes=10)
    assert _shapes(model) == shapes
