"""Pruning-at-initialisation scorers (SNIP, GraSP, SynFlow, LAMP) against hand computations, explicit Hessians
and the properties the Connectivity Matters paper reports (SynFlow: effective ~ direct sparsity; SNIP and
random: effective sparsity far above the direct one at high compression), plus the ``prune.target=effective``
bisection."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from prunelab.models import build_model
from prunelab.pruning.allocation import GlobalAllocation, UniformAllocation
from prunelab.pruning.effective import effective_masks, effective_sparsity_report
from prunelab.pruning.masks import MaskSet
from prunelab.pruning.pruner import prune
from prunelab.pruning.scorers.grasp import GraSPScorer
from prunelab.pruning.scorers.lamp import LAMPScorer, lamp_scores
from prunelab.pruning.scorers.random import RandomScorer
from prunelab.pruning.scorers.snip import SNIPScorer
from prunelab.pruning.scorers.synflow import SynFlowScorer, synaptic_flow_copy
from prunelab.pruning.target import prune_to_target, prune_with_scores


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)
    )


def _batches(n: int = 2, shape=(2, 4, 4), classes: int = 4, size: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, *shape, generator=g), torch.randint(0, classes, (size,), generator=g))
        for _ in range(n)
    ]


def test_scorers_take_their_options():
    assert SNIPScorer(num_batches=3).num_batches == 3
    g = GraSPScorer(temperature=100.0, num_batches=2)
    assert (g.temperature, g.num_batches, g.needs_data) == (100.0, 2, True)
    s = SynFlowScorer(rounds=7, input_shape=[1, 4, 4])
    assert (s.rounds, s.input_shape, s.needs_data) == (7, [1, 4, 4], False)
    assert SynFlowScorer().rounds == 100 and LAMPScorer.needs_data is False


# --- SNIP --------------------------------------------------------------------------------------------------
def test_snip_equals_abs_of_accumulated_gradient_times_weight_and_restores_the_model():
    model = _bn_net()
    model.eval()  # the scorer switches to train mode (batch statistics) and must switch back
    masks = MaskSet.from_model(model)
    batches = _batches(3)
    before = _state(model)
    scores = SNIPScorer(num_batches=2).score(model, masks, batches)

    ref = copy.deepcopy(model).train()
    for x, y in batches[:2]:
        F.cross_entropy(ref(x), y).backward()
    for n in masks:
        p = ref.get_parameter(n)
        assert torch.allclose(scores[n], (p.grad * p).abs(), rtol=1e-5, atol=1e-8), n
    # accumulation happens before the absolute value: sum_b |g_b w| is a different (wrong) score
    other = copy.deepcopy(model).train()
    p = other.get_parameter("4.weight")
    wrong = sum((torch.autograd.grad(F.cross_entropy(other(x), y), [p])[0] * p).abs() for x, y in batches[:2])
    assert not torch.allclose(scores["4.weight"], wrong.detach(), rtol=1e-3)
    assert not model.training and _same_state(model, before)  # BN running stats and mode restored
    assert all(p.grad is None for p in model.parameters())


def test_snip_scores_the_masked_model_and_depends_on_the_number_of_batches():
    model = _bn_net()
    masks = MaskSet.from_model(model)
    m = {k: v.clone() for k, v in masks.items()}
    m["0.weight"][0] = False
    masks = MaskSet(m)
    masks.apply(model)
    batches = _batches(2)
    one = SNIPScorer(num_batches=1).score(model, masks, batches)
    two = SNIPScorer(num_batches=2).score(model, masks, batches)
    assert (one["0.weight"][0] == 0).all()  # pruned weights are zero, so is their sensitivity
    assert not torch.allclose(one["4.weight"], two["4.weight"])
    with pytest.raises(ValueError, match="needs data"):
        SNIPScorer().score(model, masks, [])


# --- GraSP -------------------------------------------------------------------------------------------------
def _tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _explicit_hg(model, names, masks, batches, T):
    """H g with an explicit Hessian of sum_b L_b over the masked weights (flattened), g masked."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    flat0 = torch.cat([params[n].flatten() for n in names])

    def loss(flat):
        ps = dict(params)
        for n, chunk, s in zip(names, torch.split(flat, sizes), shapes):
            ps[n] = chunk.view(s)
        return sum(F.cross_entropy(functional_call(model, ps, (x.double(),)) / T, y) for x, y in batches)

    g = torch.autograd.functional.jacobian(loss, flat0)
    H = torch.autograd.functional.hessian(loss, flat0)
    keep = torch.cat([masks[n].flatten() for n in names]).double()
    hg = H @ (g * keep)
    return {n: c.view(s) for n, c, s in zip(names, torch.split(hg, sizes), shapes)}


@pytest.mark.parametrize("T", [1.0, 200.0])
def test_grasp_hessian_gradient_product_matches_explicit_hessian(T):
    model = _tiny_mlp()
    masks = MaskSet.from_model(model)
    m = {k: v.clone() for k, v in masks.items()}
    m["0.weight"][1, 2] = False
    m["2.weight"][0, 3] = False
    masks = MaskSet(m)
    masks.apply(model)
    batches = _batches(2, shape=(3,), classes=2, size=5)
    scores = GraSPScorer(num_batches=2, temperature=T).score(model, masks, batches)
    hg = _explicit_hg(model, list(masks), masks, batches, T)
    for n in masks:
        expected = model.get_parameter(n).detach() * hg[n]
        scale = expected.abs().max()
        assert scale > 0
        assert torch.allclose(scores[n], expected, rtol=1e-6, atol=1e-9 * scale), n


def test_grasp_sign_convention_removes_the_largest_grasp_scores():
    model = _tiny_mlp()
    masks = MaskSet.from_model(model)
    batches = _batches(2, shape=(3,), classes=2, size=5)
    hg = _explicit_hg(model, list(masks), masks, batches, 200.0)
    grasp_paper = torch.cat(
        [(-model.get_parameter(n).detach() * hg[n]).flatten() for n in masks]
    )  # S = -w Hg
    returned = GraSPScorer(num_batches=2).score(model, masks, batches)
    new = GlobalAllocation().masks_from_scores(returned, masks, 0.25)
    removed = ~torch.cat([new[n].flatten() for n in masks])
    k = int(removed.sum())
    assert k == round(0.25 * grasp_paper.numel())
    top = torch.zeros_like(removed)
    top[torch.topk(grasp_paper, k).indices] = True
    assert torch.equal(removed, top)


def test_grasp_restores_bn_statistics_and_mode():
    model = _bn_net().train()
    before = _state(model)
    GraSPScorer().score(model, MaskSet.from_model(model), _batches(1))
    assert model.training and _same_state(model, before)


# --- SynFlow -----------------------------------------------------------------------------------------------
def test_synflow_matches_the_synaptic_flow_formula_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    masks = MaskSet.from_model(model)
    before = _state(model)
    scores = SynFlowScorer(input_shape=[1, 2, 2]).score(model, masks)
    W1, b1, W2 = (
        model[1].weight.detach().double(),
        model[1].bias.detach().double(),
        model[3].weight.detach().double(),
    )
    # R = 1^T (|W2| (|W1| 1 + |b1|) + |b2|): dR/dW1[i, j] = (|W2|^T 1)_i sign(W1), dR/dW2[k, i] = h_i sign(W2)
    h = W1.abs().sum(1) + b1.abs()
    expected1 = W2.abs().sum(0)[:, None] * W1.abs()
    expected2 = h[None, :].expand(2, 3) * W2.abs()
    assert torch.allclose(scores["1.weight"], expected1) and torch.allclose(scores["3.weight"], expected2)
    assert _same_state(model, before)  # signs and values untouched
    # the input shape can also come from the first batch
    again = SynFlowScorer().score(model, masks, [(torch.zeros(5, 1, 2, 2), torch.zeros(5, dtype=torch.long))])
    assert torch.equal(again["1.weight"], scores["1.weight"])
    with pytest.raises(ValueError, match="input shape"):
        SynFlowScorer().score(model, masks, [])


@pytest.mark.parametrize(
    "name,shape,kw,beyond_float32",
    [("vgg19", (3, 32, 32), {"width": 0.5}, False), ("resnet50", (3, 16, 16), {}, True)],
)
def test_synflow_deep_nets_are_finite_in_float64(name, shape, kw, beyond_float32):
    torch.manual_seed(0)
    model = build_model(name, shape, 10, **kw)
    model.train()
    before = _state(model)
    scorer = SynFlowScorer(input_shape=list(shape))
    scores = scorer.score(model, MaskSet.from_model(model))
    flat = torch.cat([s.flatten() for s in scores.values()])
    assert torch.isfinite(flat).all() and (flat >= 0).all() and flat.max() > 0
    assert model.training and _same_state(model, before)
    if beyond_float32:  # the synaptic flow itself (~1e68 here) would overflow float32
        flow = synaptic_flow_copy(model)(torch.ones(1, *shape, dtype=torch.float64)).sum()
        assert torch.isfinite(flow) and flow > torch.finfo(torch.float32).max


def test_synflow_keeps_effective_equal_to_direct_sparsity_while_snip_and_random_do_not():
    # Connectivity Matters, Sec. 4: SynFlow masks are (nearly) free of inactive weights; SNIP and random
    # pruning at high compression leave many kept weights off every input -> output path.
    shape = (1, 28, 28)
    torch.manual_seed(0)
    base = build_model("lenet_300_100", shape, 10)
    data = [(torch.randn(64, *shape), torch.randint(0, 10, (64,)))]
    result = {}
    for key, scorer in {
        "synflow": SynFlowScorer(rounds=100, input_shape=list(shape)),
        "snip": SNIPScorer(),
        "random": RandomScorer(seed=0),
    }.items():
        model = copy.deepcopy(base)
        masks = prune(model, MaskSet.from_model(model), scorer, GlobalAllocation(), 0.99, data)
        result[key] = effective_sparsity_report(model, masks, shape)
    assert result["synflow"]["compression_direct"] == pytest.approx(100.0)
    assert result["synflow"]["compression_effective"] <= 1.03 * 100.0
    assert result["snip"]["compression_effective"] > 1.5 * 100.0
    assert result["random"]["compression_effective"] > 5 * 100.0


# --- LAMP --------------------------------------------------------------------------------------------------
def test_lamp_formula_by_hand():
    w = torch.tensor([1.0, -2.0, 3.0, 0.5])
    # w^2 = 1, 4, 9, .25; denominators: sum of squares at least as large
    expected = torch.tensor([1 / 14, 4 / 13, 9 / 9, 0.25 / 14.25], dtype=torch.float64)
    assert torch.allclose(lamp_scores(w), expected)
    # ties share the denominator that contains all of them
    assert torch.allclose(
        lamp_scores(torch.tensor([2.0, -2.0, 1.0])), torch.tensor([0.5, 0.5, 1 / 9]).double()
    )
    assert torch.equal(lamp_scores(torch.zeros(2, 3)), torch.zeros(2, 3, dtype=torch.float64))
    m = torch.randn(4, 5)
    assert lamp_scores(m).shape == (4, 5) and lamp_scores(m).max() == 1.0


def test_lamp_with_global_allocation_keeps_every_layer_alive():
    torch.manual_seed(0)
    model = build_model("mlp", (1, 4, 4), 3, hidden=(32, 32))
    with torch.no_grad():
        model[3].weight.mul_(100.0)  # magnitude pruning would wipe out the other layers
    masks = MaskSet.from_model(model)
    scores = LAMPScorer().score(model, masks)
    for n in masks:
        w2 = model.get_parameter(n).detach().double().flatten() ** 2
        i = int(torch.argmin(w2))
        assert scores[n].flatten()[i] == pytest.approx(float(w2[i] / w2.sum()))
    new = GlobalAllocation().masks_from_scores(scores, masks, 0.98)
    assert all(int(new[n].sum()) >= 1 for n in new)
    magnitude = {n: model.get_parameter(n).detach().abs() for n in masks}
    wiped = GlobalAllocation().masks_from_scores(magnitude, masks, 0.98)
    assert any(int(wiped[n].sum()) == 0 for n in wiped)  # the case is one where LAMP's guarantee matters


# --- prune.target = effective ------------------------------------------------------------------------------
def _effective_sparsity(model, masks, shape) -> float:
    eff = effective_masks(model, masks, shape)
    return 1.0 - sum(int(v.sum()) for v in eff.values()) / masks.numel()


@pytest.mark.parametrize("allocation", [GlobalAllocation(), UniformAllocation()], ids=["global", "uniform"])
def test_effective_target_is_met_within_one_weight_with_reused_scores(allocation):
    shape = (1, 6, 6)
    torch.manual_seed(0)
    model = build_model("mlp", shape, 4, hidden=(24, 12))
    original = _state(model)
    masks = MaskSet.from_model(model)
    scorer = RandomScorer(seed=3)
    out, info = prune_to_target(model, masks, scorer, allocation, 0.9, target="effective", input_shape=shape)
    assert info["converged"] and info["step"] == 1 and info["probes"] <= 30
    r = info["removed"]
    scores = scorer.score(model, masks)
    at_r = prune_with_scores(scores, masks, allocation, r / masks.numel())
    before_r = prune_with_scores(scores, masks, allocation, (r - 1) / masks.numel())
    assert at_r.equal(out)
    assert _effective_sparsity(model, at_r, shape) >= 0.9 > _effective_sparsity(model, before_r, shape)
    assert info["sparsity_effective"] >= 0.9 and info["sparsity_direct_needed"] < 0.9
    # the model holds the original weights, zero where pruned
    for k, v in model.state_dict().items():
        expected = original[k] * out[k] if k in out else original[k]
        assert torch.equal(v, expected), k


def test_effective_target_with_an_iterative_scorer_reruns_the_schedule():
    shape = (1, 6, 6)
    torch.manual_seed(0)
    model = build_model("mlp", shape, 4, hidden=(24, 12))
    original = _state(model)
    masks = MaskSet.from_model(model)
    scorer = SynFlowScorer(rounds=3, input_shape=list(shape))
    out, info = prune_to_target(
        model, masks, scorer, GlobalAllocation(), 0.95, target="effective", input_shape=shape, tol=0.002
    )
    assert info["converged"] and info["step"] == max(1, int(0.002 * masks.numel()))
    r, step = info["removed"], info["step"]

    def masks_at(removed: int) -> MaskSet:
        m = copy.deepcopy(model)
        m.load_state_dict(original)
        return prune(m, MaskSet.from_model(m), scorer, GlobalAllocation(), removed / masks.numel())

    assert masks_at(r).equal(out)
    assert (
        _effective_sparsity(model, out, shape) >= 0.95 > _effective_sparsity(model, masks_at(r - step), shape)
    )


def test_direct_target_is_plain_pruning():
    shape = (1, 6, 6)
    torch.manual_seed(0)
    model = build_model("mlp", shape, 4, hidden=(24, 12))
    reference = copy.deepcopy(model)
    masks = MaskSet.from_model(model)
    out, info = prune_to_target(
        model, masks, RandomScorer(seed=1), GlobalAllocation(), 0.8, input_shape=shape
    )
    expected = prune(reference, MaskSet.from_model(reference), RandomScorer(seed=1), GlobalAllocation(), 0.8)
    assert out.equal(expected) and info["sparsity_direct_needed"] == pytest.approx(0.8, abs=1e-3)
    assert info["sparsity_effective"] >= info["sparsity_direct_needed"]
    with pytest.raises(ValueError, match="input shape"):
        prune_to_target(model, masks, RandomScorer(), GlobalAllocation(), 0.8, target="effective")
