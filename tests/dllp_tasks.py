"""Small DLLP tasks shared by tests/test_dllp.py and scripts/dllp_prior_compare.py: a ReLU MLP factory, a
digits MLP trained on sklearn's 8x8 digits, DLLP's decision with the method's defaults, and one-shot L2 unit
pruning at given per-layer unit counts (the baseline at equal unit sparsity)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from prunelab.pruning.bayes.dllp import DLLP, attach_gates


def mlp(widths=(5, 12, 6, 3)) -> nn.Sequential:
    """A ReLU MLP with the given layer widths (no activation after the last layer)."""
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def accuracy(net: nn.Module, data: tuple) -> float:
    """Top-1 accuracy of ``net`` on ``data = (x, y)``."""
    with torch.no_grad():
        return (net(data[0]).argmax(-1) == data[1]).float().mean().item()


def decide(net: nn.Module, train: tuple, seed: int, sparsity: float, steps: int = 150, importance: str = "taylor"):
    """DLLP with the method's defaults (function prior, W frozen, unit-budget tilt, Adam lr 0.1 on the particles,
    decision=target) on a deep copy of ``net``: ``(unit masks, controller)``."""
    net = copy.deepcopy(net)
    gen = torch.Generator().manual_seed(seed)
    n, b = len(train[1]), 128
    batches = [(train[0][i * b : (i + 1) * b], train[1][i * b : (i + 1) * b]) for i in range(4)]
    dm = attach_gates(net, importance=importance, n_particles=10, target_density=1 - sparsity, generator=gen,
                      data=batches)
    dl = DLLP(dm, n_train=n, density=1 - sparsity, dual_lr=0.5)
    opt = dl.particle_optimizer(lr=0.1)
    for s in range(steps):
        dl.set_progress(s / steps)
        idx = torch.randint(0, n, (b,), generator=gen)
        dl.train_step(train[0][idx], train[1][idx], opt)
    return dl.unit_masks(target_sparsity=sparsity), dl


def digits_mlp(seed: int):
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = torch.tensor(d.data, dtype=torch.float32) / 16, torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = (x[perm[:1400]], y[perm[:1400]]), (x[perm[1400:]], y[perm[1400:]])
    torch.manual_seed(seed)
    net = mlp((64, 48, 32, 10))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(600):
        idx = torch.randint(0, 1400, (64,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(net(train[0][idx]), train[1][idx]).backward()
        opt.step()
    return net, train, test


def l2_same_counts(net: nn.Module, counts: dict[str, int]) -> nn.Module:
    """One-shot L2 unit pruning keeping, in each named Linear layer, the ``counts[name]`` units of largest
    incoming-weight norm (rows and biases of the others zeroed)."""
    out = copy.deepcopy(net)
    with torch.no_grad():
        for name, k in counts.items():
            layer = out.get_submodule(name)
            mask = torch.zeros(layer.out_features, dtype=torch.bool)
            mask[layer.weight.norm(dim=1).argsort(descending=True)[:k]] = True
            layer.weight.mul_(mask[:, None])
            layer.bias.mul_(mask)
    return out
