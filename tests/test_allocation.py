"""Quota properties of ``prunelab.pruning.allocation``: IGQ (Vysogorets & Kempe 2023, Sec. 5), ERK (Evci et
al. 2020), uniform+ (Gale et al. 2019), exact per-layer removal counts for random pruning, and nestedness."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from prunelab.models import build_model
from prunelab.pruning.allocation import (
    AllocationError,
    ERKAllocation,
    GlobalAllocation,
    IGQAllocation,
    UniformAllocation,
    UniformPlusAllocation,
)
from prunelab.pruning.masks import MaskSet
from prunelab.pruning.pruner import prune
from prunelab.pruning.scorers.magnitude import MagnitudeScorer
from prunelab.pruning.scorers.random import RandomScorer

# a VGG-like set of layer shapes spanning three orders of magnitude in size
SHAPES = {
    "c1": (16, 3, 3, 3),
    "c2": (32, 16, 3, 3),
    "c3": (64, 32, 3, 3),
    "c4": (128, 64, 3, 3),
    "c5": (128, 128, 3, 3),
    "fc": (10, 128),
}
SIZES = {n: math.prod(s) for n, s in SHAPES.items()}
N = sum(SIZES.values())


def _kept(sl: dict[str, float]) -> float:
    return sum((1.0 - sl[n]) * SIZES[n] for n in SHAPES)


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.99, 0.999])
def test_igq_densities_follow_one_gas_constant_and_meet_the_total(sparsity):
    sl = IGQAllocation().layer_sparsities(SHAPES, sparsity)
    # d_l = 1 / (1 + F n_l)  <=>  (1 / d_l - 1) / n_l = F, the same for every layer
    Fs = [(1.0 / (1.0 - sl[n]) - 1.0) / SIZES[n] for n in SHAPES]
    assert max(Fs) == pytest.approx(min(Fs), rel=1e-9) and min(Fs) > 0
    assert abs(_kept(sl) - (1.0 - sparsity) * N) <= 1.0  # continuous kept count within one weight
    counts = IGQAllocation().removal_counts(SHAPES, sparsity)
    assert 0 <= sparsity * N - sum(counts.values()) <= len(SHAPES)  # floor per layer
    # larger layers are pruned more, and never completely
    order = sorted(SHAPES, key=SIZES.get)
    assert all(sl[a] < sl[b] for a, b in zip(order, order[1:]) if SIZES[a] < SIZES[b])
    assert all(sl[n] < 1.0 for n in SHAPES)


def test_igq_solve_F_limits():
    sizes = list(SIZES.values())
    assert IGQAllocation.solve_F(sizes, float(N)) == 0.0
    assert IGQAllocation.solve_F(sizes, 0.0) == math.inf


@pytest.mark.parametrize("sparsity", [0.3, 0.8, 0.95, 0.995])
def test_erk_density_is_proportional_to_the_erk_ratio_among_non_dense_layers(sparsity):
    sl = ERKAllocation().layer_sparsities(SHAPES, sparsity)
    ratio = {n: sum(s) / math.prod(s) for n, s in SHAPES.items()}
    sparse = [n for n in SHAPES if sl[n] > 1e-12]
    dense = [n for n in SHAPES if sl[n] <= 1e-12]
    eps = [(1.0 - sl[n]) / ratio[n] for n in sparse]
    assert sparse and max(eps) == pytest.approx(min(eps), rel=1e-9)
    # a layer made dense would have exceeded density 1 with the common constant
    assert all(eps[0] * ratio[n] >= 1.0 - 1e-12 for n in dense)
    assert _kept(sl) == pytest.approx((1.0 - sparsity) * N, abs=1e-6)
    counts = ERKAllocation().removal_counts(SHAPES, sparsity)
    assert 0 <= sparsity * N - sum(counts.values()) <= len(SHAPES)


def test_erk_makes_small_layers_dense_at_low_sparsity():
    sl = ERKAllocation().layer_sparsities(SHAPES, 0.3)
    assert sl["c1"] == pytest.approx(0.0) and sl["fc"] == pytest.approx(0.0)
    assert sl["c5"] > 0.3


def test_uniform_plus_rules():
    alloc = UniformPlusAllocation(max_last=0.8)
    sl = alloc.layer_sparsities(SHAPES, 0.5)
    mids = [sl[n] for n in list(SHAPES)[1:-1]]
    assert sl["c1"] == 0.0 and max(mids) == pytest.approx(min(mids))
    assert sl["fc"] == pytest.approx(mids[0])  # below the cap, the last layer follows the others
    assert _kept(sl) == pytest.approx(0.5 * N)
    sl = alloc.layer_sparsities(SHAPES, 0.95)
    mids = [sl[n] for n in list(SHAPES)[1:-1]]
    assert sl["fc"] == pytest.approx(0.8) and mids[0] > 0.8 and max(mids) == pytest.approx(min(mids))
    assert _kept(sl) == pytest.approx(0.05 * N)
    with pytest.raises(AllocationError):
        alloc.layer_sparsities(SHAPES, 0.999)  # the dense first layer alone holds more than 0.1% of N
    with pytest.raises(AllocationError):
        alloc.layer_sparsities({"a": (3, 3), "b": (3, 3)}, 0.5)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        for n, s in SHAPES.items():
            setattr(self, n, nn.Conv2d(s[1], s[0], s[2:]) if len(s) == 4 else nn.Linear(s[1], s[0]))


@pytest.mark.parametrize(
    "alloc",
    [UniformAllocation(), ERKAllocation(), IGQAllocation(), UniformPlusAllocation()],
    ids=lambda a: a.name,
)
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_random_quota_pruning_removes_exactly_floor_per_layer(alloc, sparsity):
    torch.manual_seed(0)
    model = _Net()
    masks = MaskSet.from_model(model)
    shapes = {n: tuple(m.shape) for n, m in masks.items()}
    counts = alloc.removal_counts(shapes, sparsity)
    sl = alloc.layer_sparsities(shapes, sparsity)
    new = prune(model, masks, RandomScorer(seed=1), alloc, sparsity)
    for n, m in new.items():
        assert int((~m).sum()) == counts[n] == math.floor(sl[n] * m.numel() + 1e-9), n
        assert (model.get_parameter(n).detach()[~m] == 0).all()  # pruner applies the masks


def test_global_allocation_removes_the_exact_total_of_the_lowest_scores():
    torch.manual_seed(0)
    model = _Net()
    masks = MaskSet.from_model(model)
    scores = RandomScorer(seed=2).score(model, masks)
    new = GlobalAllocation().masks_from_scores(scores, masks, 0.9)
    assert new.remaining() == round(0.1 * masks.numel())
    kept = torch.cat([scores[n].flatten()[new[n].flatten()] for n in new])
    dropped = torch.cat([scores[n].flatten()[~new[n].flatten()] for n in new])
    assert kept.min() >= dropped.max()


def test_random_scores_differ_across_seeds_and_repeat_for_one_seed():
    model = _Net()
    masks = MaskSet.from_model(model)
    a, b, c = (RandomScorer(seed=s).score(model, masks) for s in (0, 0, 1))
    assert all(torch.equal(a[n], b[n]) for n in masks) and not all(torch.equal(a[n], c[n]) for n in masks)


@pytest.mark.parametrize(
    "alloc",
    [GlobalAllocation(), UniformAllocation(), ERKAllocation(), IGQAllocation(), UniformPlusAllocation()],
    ids=lambda a: a.name,
)
@pytest.mark.parametrize("scorer", [RandomScorer(seed=0), MagnitudeScorer()], ids=["random", "magnitude"])
def test_masks_are_nested_over_increasing_sparsity(alloc, scorer):
    torch.manual_seed(0)
    model = build_model("lenet5", (1, 16, 16), 10)
    masks = MaskSet.from_model(model)
    previous = masks
    for s in (0.3, 0.6, 0.8, 0.9):
        new = prune(model, previous, scorer, alloc, s)
        assert all(not (new[n] & ~previous[n]).any() for n in new)  # a pruned weight stays pruned
        assert new.sparsity() >= previous.sparsity()
        assert new.sparsity() == pytest.approx(s, abs=len(new) / new.numel() + 1e-6)
        previous = new
