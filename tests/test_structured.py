"""Structured criteria (Molchanov et al. 2019) and the iterative pruner: identities that fail if a formula is
wrong (missing square, wrong sign, gate before BN, missing bias term, wrong Hessian diagonal)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

from prunelab.models import build_model
from prunelab.pruning.structured import criteria as C
from prunelab.pruning.structured.pruner import PruneSchedule, StructuredPruner, per_group_masks
from prunelab.pruning.units.gates import Gates
from prunelab.pruning.units.groups import ChannelGroup, GateSite, GroupMember, build_groups


def _group(model: nn.Module, groups, name: str) -> ChannelGroup:
    return next(g for g in groups if any(m.name == name for m in g.producers()))


def _manual_group(name: str, n: int, layer_type: str = "Linear", dim: int = -1) -> ChannelGroup:
    """A single layer's outputs as a group (lets the gated layer be the model's output)."""
    mem = GroupMember(name, "out", layer_type, tuple(range(n)), tuple(range(n)))
    return ChannelGroup(id=name, members=[mem], num_units=n, gates=[GateSite(name, dim)])


# ---------------------------------------------------------------------------------------------------------
# gate-gradient identities
# ---------------------------------------------------------------------------------------------------------
def test_gate_grad_equals_filter_sum_without_bn():
    """z dL/dz == sum over the filter of w dL/dw + b dL/db (conv with bias, no BN)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 5))
    x, y = torch.randn(7, 3, 8, 8), torch.randint(0, 5, (7,))
    groups = build_groups(model, x[:1])
    g0 = _group(model, groups, "0")
    assert [s.name for s in g0.gates] == ["0"]
    gates = Gates(model, groups)
    F.cross_entropy(model(x), y).backward()
    conv = model[0]
    per_filter = (conv.weight * conv.weight.grad).sum((1, 2, 3)) + conv.bias * conv.bias.grad
    zg = gates.z[g0.id] * gates.z[g0.id].grad
    torch.testing.assert_close(zg, per_filter.detach(), atol=1e-6, rtol=1e-4)
    # the bias term matters: without it the identity is off
    assert not torch.allclose(zg, (conv.weight * conv.weight.grad).sum((1, 2, 3)).detach(), atol=1e-6)
    torch.testing.assert_close(C.taylor_fo(gates)[g0.id], per_filter.detach().pow(2), atol=1e-8, rtol=1e-4)


def test_gate_grad_after_bn_equals_gamma_beta_terms():
    """Gate after BN: z dL/dz == gamma dL/dgamma + beta dL/dbeta (train-mode BN)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.normal_()
    x, y = torch.randn(7, 3, 8, 8), torch.randint(0, 5, (7,))
    groups = build_groups(model, x[:1])
    g0 = _group(model, groups, "0")
    assert [s.name for s in g0.gates] == ["1"]  # after the BN, not between conv and BN
    gates = Gates(model, groups)
    model.train()
    F.cross_entropy(model(x), y).backward()
    bn = model[1]
    expected = (bn.weight * bn.weight.grad + bn.bias * bn.bias.grad).detach()
    torch.testing.assert_close(gates.z[g0.id].grad, expected, atol=1e-6, rtol=1e-4)
    # a gate before the BN would see ~0 (train-mode BN is scale invariant): the two must differ
    conv = model[0]
    before = (conv.weight * conv.weight.grad).sum((1, 2, 3)).detach()
    assert before.abs().max() < 1e-4 * expected.abs().max() + 1e-7
    assert expected.abs().max() > 1e-3


def test_residual_group_shares_one_gate():
    """Residual-coupled channels: one z multiplies every block output; dL/dz sums over the BN members."""
    torch.manual_seed(0)
    model = build_model("resnet20", (3, 16, 16), 4)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 4, (4,))
    groups = build_groups(model, x[:1])
    g = _group(model, groups, "layer2.0.downsample.1")
    sites = {s.name for s in g.gates}
    assert sites == {"layer2.0.downsample.1", "layer2.0.bn2", "layer2.1.bn2", "layer2.2.bn2"}
    gates = Gates(model, groups)
    model.train()
    F.cross_entropy(model(x), y).backward()
    expected = sum(
        (m.weight * m.weight.grad + m.bias * m.bias.grad).detach() for m in map(model.get_submodule, sites)
    )
    torch.testing.assert_close(gates.z[g.id].grad, expected, atol=1e-6, rtol=1e-4)


def _stage_gate_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Molchanov et al.'s code's ResNet gating, written out: one gate vector per stage (``gate_skip*``), a
    module shared by the stage's blocks, multiplying each block's output after add+ReLU. Returns dL/dg per
    stage (g = 1), i.e. sum over the stage's blocks of sum_{n,h,w} dL/dy * y."""
    gates, handles = {}, []
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        if not hasattr(model, stage):
            continue
        blocks = list(model.get_submodule(stage))
        last_bn = blocks[-1].bn3 if hasattr(blocks[-1], "bn3") else blocks[-1].bn2
        g = torch.ones(last_bn.num_features, requires_grad=True)
        gates[stage] = g
        handles += [b.register_forward_hook(lambda m, i, o, g=g: o * g.view(1, -1, 1, 1)) for b in blocks]
    try:
        F.cross_entropy(model(x), y).backward()
    finally:
        for h in handles:
            h.remove()
    return {k: g.grad for k, g in gates.items()}


@pytest.mark.parametrize("arch", ["resnet50", "resnet20"])
def test_block_output_gates_are_the_reference_stage_gates(arch):
    """method.residual_gates=block_output: a residual group's gate multiplies the output of every block of its
    stage (after add+ReLU), dL/dz equals the reference code's stage-gate gradient, the stem's group is gone, the
    per-BN gates inside the blocks are unchanged; the default gates (before the addition) read another gradient."""
    torch.manual_seed(0)
    shape = (3, 32, 32) if arch == "resnet50" else (3, 16, 16)
    model = build_model(arch, shape, 4)
    x, y = torch.randn(4, *shape), torch.randint(0, 4, (4,))
    model.train()
    ref = _stage_gate_grads(model, x, y)
    model.zero_grad()
    default = StructuredPruner(model, x[:1], "taylor_fo")
    pruner = StructuredPruner(model, x[:1], "taylor_fo", groups=default.groups, residual_gates="block_output")
    default.remove_gates()
    assert "conv1" in {g.id for g in default.groups} and "conv1" not in {g.id for g in pruner.groups}
    residual = {g.id: g for g in pruner.groups if len(g.gates) > 1}
    assert len(residual) == len(ref) - (arch == "resnet20")  # resnet20's first stage is coupled with the stem
    inner = {g.id: g.gates for g in default.groups if len(g.gates) == 1 and g.id != "conv1"}
    assert inner == {g.id: g.gates for g in pruner.groups if len(g.gates) == 1}
    F.cross_entropy(model(x), y).backward()
    for g in residual.values():
        stage = g.gates[0].name.split(".")[0]
        assert [s.name for s in g.gates] == [f"{stage}.{i}" for i in range(len(model.get_submodule(stage)))]
        torch.testing.assert_close(pruner.gates.z[g.id].grad, ref[stage], atol=1e-5, rtol=1e-4)
    pruner.remove_gates()
    model.zero_grad()
    default.gates.install()
    F.cross_entropy(model(x), y).backward()
    g = next(iter(residual.values()))
    assert not torch.allclose(default.gates.z[g.id].grad, ref[g.gates[0].name.split(".")[0]], atol=1e-4)


def test_block_output_gates_are_the_blocks_not_their_submodules():
    """timm's SE-ResNet: the squeeze-excitation module inside a block also writes the residual channels; the gate
    still goes on the block's output only (a gate on the SE output would read dL/dz before the addition)."""
    from prunelab.pruning.units.groups import block_output_gates

    model = build_model("timm", (3, 32, 32), 10, arch="seresnet18")
    x = torch.zeros(2, 3, 32, 32)
    groups = build_groups(model, x)
    assert any(s.name.endswith(".se") or ".se." in s.name for g in groups for s in g.gates)  # the default does
    regated = block_output_gates(model, groups, x)
    residual = {g.id: [s.name for s in g.gates] for g in regated if len(g.gates) > 1}
    assert sorted(residual.values()) == [[f"layer{i}.0", f"layer{i}.1"] for i in (2, 3, 4)]
    assert "conv1" not in {g.id for g in regated}


@pytest.mark.parametrize("arch", ["resnet50", "resnet18"])
def test_block_output_masked_network_equals_the_compacted_one(arch):
    """Masks through block-output gates give the same function as the compacted network (a channel zeroed
    after every block of its stage is zero wherever it is read)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = build_model(arch, (3, 32, 32), 10).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2, generator=gen)
                m.bias.normal_(0, 0.2, generator=gen)
    x = torch.randn(3, 3, 32, 32, generator=gen)
    pruner = StructuredPruner(model, x[:1], "taylor_fo", residual_gates="block_output")
    masks = {g.id: torch.rand(g.num_units, generator=gen) < 0.6 for g in pruner.groups}
    for m in masks.values():
        m[0] = True
    pruner.gates.set_masks(masks)
    with torch.no_grad():
        y_masked = model(x)
        small = pruner.compact().eval()
        torch.testing.assert_close(small(x), y_masked, atol=1e-5, rtol=1e-5)
        pruner.remove_gates()
        assert (model(x) - y_masked).abs().max() > 1e-3
    assert small.conv1.out_channels == model.conv1.out_channels  # the stem is never pruned


def test_residual_gates_errors_name_the_option():
    from prunelab.pruning.structured.method import StructuredMethod

    with pytest.raises(ValueError, match=r"method.residual_gates='stage'.*producers, block_output"):
        StructuredMethod(residual_gates="stage")
    model = build_model("lenet5", (1, 28, 28), 10)
    with pytest.raises(ValueError, match="residual_gates=block_output.*no residual-coupled"):
        StructuredPruner(model, torch.zeros(1, 1, 28, 28), residual_gates="block_output")


# ---------------------------------------------------------------------------------------------------------
# exactness of the Taylor expansions
# ---------------------------------------------------------------------------------------------------------
def _linear_setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Linear(6, 3))  # no nonlinearity
    x, y = torch.randn(8, 5), torch.randn(8, 3)
    groups = build_groups(model, x[:1])
    assert [g.id for g in groups] == ["0"]
    return model, x, y, groups, Gates(model, groups)


def test_first_order_exact_for_loss_linear_in_weights():
    """L = sum(outputs) is linear in the gates: (z g)^2 equals the oracle exactly, and -z g the signed
    change in loss (a sign error in either would fail)."""
    model, x, y, groups, gates = _linear_setup()

    def loss_fn(out, _):
        return out.sum()

    fo = C.batch_scores("taylor_fo", model, gates, groups, (x, y), loss_fn)["0"]
    signed = C.taylor_fo_signed(gates)["0"]
    delta = C.oracle_delta(model, gates, [(x, y)], loss_fn)["0"]
    torch.testing.assert_close(fo, delta.pow(2), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(-signed, delta, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(C.oracle(model, gates, [(x, y)], loss_fn)["0"], delta.pow(2))
    assert delta.abs().min() > 1e-3


def test_second_order_exact_for_loss_quadratic_in_gate():
    """MSE of a linear network is quadratic in the gates: (-z g + z^2 H_zz / 2)^2 equals the oracle, while
    the first-order score does not."""
    model, x, y, groups, gates = _linear_setup()
    so = C.batch_scores("taylor_so", model, gates, groups, (x, y), F.mse_loss)["0"]
    fo = C.batch_scores("taylor_fo", model, gates, groups, (x, y), F.mse_loss)["0"]
    orc = C.oracle(model, gates, [(x, y)], F.mse_loss)["0"]
    torch.testing.assert_close(so, orc, atol=1e-6, rtol=1e-4)
    assert (fo - orc).abs().max() > 1e-2 * orc.max()


def test_hessian_diagonal_exact_matches_autograd_hessian():
    """Batched one-hot HVPs through conv + train-mode BN give the true diagonal of d2L/dz2."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 5, 3, bias=False), nn.BatchNorm2d(5), nn.Tanh(), nn.Conv2d(5, 4, 3),
                          nn.Tanh(), nn.Flatten(), nn.Linear(4 * 2 * 2, 3))
    x, y = torch.randn(6, 2, 6, 6), torch.randint(0, 3, (6,))
    groups = build_groups(model, x[:1])
    gates = Gates(model, groups)
    model.train()
    g, h = C.gate_hessian_diag(F.cross_entropy(model(x), y), gates, mode="exact", chunk=3)
    gid = _group(model, groups, "0").id
    others = {k: v.detach().clone() for k, v in gates.z.items() if k != gid}

    def loss_of(z):
        saved = gates.z[gid]
        gates.z[gid] = z
        try:
            return F.cross_entropy(model(x), y)
        finally:
            gates.z[gid] = saved

    full = torch.autograd.functional.hessian(loss_of, torch.ones(5))
    torch.testing.assert_close(h[gid], full.diagonal(), atol=1e-6, rtol=1e-4)
    assert (full - torch.diag(full.diagonal())).abs().max() > 1e-4  # off-diagonal terms exist
    assert others  # the second group exists and was untouched


def test_hutchinson_exact_for_diagonal_hessian_and_unbiased():
    """Hutchinson: exact with one sample when the Hessian is diagonal; close to exact on average otherwise."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6))
    x, y = torch.randn(9, 4), torch.randn(9, 6)
    groups = [_manual_group("0", 6)]
    gates = Gates(model, groups)

    def loss():
        return ((model(x) - y) ** 2 * torch.linspace(0.5, 2, 6)).sum()  # separable in the gates

    _, h_exact = C.gate_hessian_diag(loss(), gates, mode="exact")
    _, h_hutch = C.gate_hessian_diag(loss(), gates, mode="hutchinson", samples=1)
    torch.testing.assert_close(h_hutch["0"], h_exact["0"])

    model2 = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    gates2 = Gates(model2, [_manual_group("0", 6)])
    gen = torch.Generator().manual_seed(0)
    y2 = torch.randn(9, 2)
    _, e = C.gate_hessian_diag(F.mse_loss(model2(x), y2), gates2, mode="exact")
    _, hs = C.gate_hessian_diag(F.mse_loss(model2(x), y2), gates2, mode="hutchinson", samples=4000,
                                generator=gen)
    assert (hs["0"] - e["0"]).abs().max() < 0.1 * e["0"].abs().max()


# ---------------------------------------------------------------------------------------------------------
# baselines
# ---------------------------------------------------------------------------------------------------------
def test_weight_variant_l2_and_bn_scale_on_residual_group():
    torch.manual_seed(0)
    model = build_model("resnet20", (3, 16, 16), 4)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 4, (4,))
    groups = build_groups(model, x[:1])
    g = _group(model, groups, "layer3.0.downsample.1")
    convs = [m.name for m in g.producers() if m.layer_type == "Conv2d"]
    bns = [m.name for m in g.producers() if m.layer_type == "BatchNorm2d"]
    assert len(convs) == 4 and len(bns) == 4
    gates = Gates(model, groups)
    F.cross_entropy(model(x), y).backward()
    fow = C.taylor_fo_weight(model, groups)[g.id]
    l2 = C.l2_norm(model, groups)[g.id]
    bs = C.bn_scale(model, groups)[g.id]
    exp_fow = sum((model.get_submodule(n).weight * model.get_submodule(n).weight.grad).pow(2).sum((1, 2, 3))
                  for n in convs).detach()
    exp_l2 = sum(model.get_submodule(n).weight.detach().flatten(1).norm(dim=1) for n in convs)
    exp_bs = sum(model.get_submodule(n).weight.detach().abs() for n in bns)
    torch.testing.assert_close(fow, exp_fow)
    torch.testing.assert_close(l2, exp_l2)
    torch.testing.assert_close(bs, exp_bs)
    # the weight variant is a sum of squares, not the square of the sum (taylor_fo)
    assert not torch.allclose(fow, C.taylor_fo(gates)[g.id], rtol=1e-2)
    with pytest.raises(ValueError, match="BatchNorm"):
        mlp = build_model("mlp", (1, 4, 4), 3)
        C.bn_scale(mlp, build_groups(mlp, torch.randn(1, 1, 4, 4)))


# ---------------------------------------------------------------------------------------------------------
# correlation with the oracle
# ---------------------------------------------------------------------------------------------------------
def _trained_mlp():
    torch.manual_seed(0)
    d, k, n = 20, 5, 1024
    centers = torch.randn(k, d)
    y = torch.randint(0, k, (n,))
    x = (centers[y] + torch.randn(n, d)).view(n, 1, 4, 5)
    model = build_model("mlp", (1, 4, 5), k, hidden=(32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(10):
        for i in range(0, n, 64):
            loss = F.cross_entropy(model(x[i:i + 64]), y[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model, x, y


def test_taylor_fo_rank_correlates_with_oracle():
    """Spearman(taylor_fo, oracle) is high on a trained MLP; the signed (unsquared) variant fails the bound."""
    model, x, y = _trained_mlp()
    groups = build_groups(model, x[:1])
    gates = Gates(model, groups)
    batches = [(x[i:i + 128], y[i:i + 128]) for i in range(0, 512, 128)]
    res = C.all_criteria_scores(model, gates, groups, batches, F.cross_entropy,
                                criteria=("taylor_fo", "random", "oracle"))
    gid = groups[0].id
    delta = C.oracle_delta(model, gates, batches, F.cross_entropy)[gid]
    torch.testing.assert_close(res["oracle"][gid], delta.pow(2))
    acc = C.ScoreAccumulator()
    for xb, yb in batches:
        gates.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        acc.add(C.taylor_fo_signed(gates))
    signed = acc.interval_mean()[gid]
    bound = 0.75
    rho = spearmanr(res["taylor_fo"][gid], res["oracle"][gid]).statistic
    assert rho > bound
    assert spearmanr(signed, res["oracle"][gid]).statistic < bound
    assert spearmanr(res["random"][gid], res["oracle"][gid]).statistic < bound
    # in a trained network removing a unit mostly increases the loss (oracle sign convention)
    assert delta[res["oracle"][gid].argmax()] > 0


# ---------------------------------------------------------------------------------------------------------
# accumulation and the pruner
# ---------------------------------------------------------------------------------------------------------
def test_accumulator_interval_mean_and_ema():
    acc = C.ScoreAccumulator(momentum=0.9)
    acc.add({"a": torch.tensor([1.0, 2.0])})
    acc.add({"a": torch.tensor([3.0, 6.0])})
    torch.testing.assert_close(acc.update()["a"], torch.tensor([2.0, 4.0]))
    acc.add({"a": torch.tensor([12.0, 14.0])})
    torch.testing.assert_close(acc.update()["a"], torch.tensor([0.9 * 2 + 0.1 * 12, 0.9 * 4 + 0.1 * 14]))
    masks = {"a": torch.tensor([True, False])}
    torch.testing.assert_close(C.normalize_scores({"a": torch.tensor([3.0, 4.0])}, masks, "l2")["a"],
                               torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(C.normalize_scores({"a": torch.tensor([3.0, 4.0, 5.0])},
                                                  {"a": torch.tensor([True, True, True])}, "mean")["a"],
                               torch.tensor([0.75, 1.0, 1.25]))


def _small_cnn():
    torch.manual_seed(0)
    model = build_model("vgg11", (3, 16, 16), 4, width=0.125)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    return model, x, y


def test_step_removes_k_lowest_globally_and_scores_stay_zero():
    model, x, y = _small_cnn()
    p = StructuredPruner(model, x[:1], "l2_norm")
    scores = p.scores()
    flat = sorted((float(s[u]), gid, u) for gid, s in scores.items() for u in range(s.numel()))
    assert p.step(5, stop_at_target=False) == 5
    removed = {(gid, u) for gid, m in p.masks().items() for u in (~m).nonzero().flatten().tolist()}
    assert removed == {(gid, u) for _, gid, u in flat[:5]}
    after = p.scores()
    assert all(float(after[gid][u]) == 0.0 for gid, u in removed)
    # never below one unit per group
    p.step(10_000, stop_at_target=False)
    assert all(int(m.sum()) == 1 for m in p.masks().values())


def test_training_loop_schedule_taylor_fo_and_targets():
    model, x, y = _small_cnn()
    p = StructuredPruner(model, x[:1], "taylor_fo", schedule=PruneSchedule(frequency=2, k=3, target=9,
                                                                           target_kind="units"))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    removed = []
    for _ in range(8):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        removed.append(p.after_backward())
        opt.step()
        p.apply_masks()
    assert removed == [0, 3, 0, 3, 0, 3, 0, 0]
    assert p.done() and p.pruned_units() == 9
    # pruned parameters are zero
    pm = p.param_masks()
    assert sum(int((~m).sum()) for m in pm.values()) > 0
    for name, m in pm.items():
        assert (model.get_parameter(name)[~m] == 0).all()
    # FLOPs target: stop at the smallest prefix of the ranking that reaches it
    q = StructuredPruner(model, x[:1], "taylor_fo", groups=p.groups)
    q.accumulate_batch(x, y)
    order = q._removal_order(q.scores())
    full = {gid: torch.ones_like(m) for gid, m in q.masks().items()}

    def after(n):
        masks = {gid: m.clone() for gid, m in full.items()}
        for gid, u in order[:n]:
            masks[gid][u] = False
        return masks

    n = q.step(k=q.total_units, target=0.3, target_kind="flops")
    assert n >= 2
    assert {g: m.tolist() for g, m in q.masks().items()} == {g: m.tolist() for g, m in after(n).items()}
    assert q.cost.reduction(after(n))[0] >= 0.3 > q.cost.reduction(after(n - 1))[0]
    assert q.done(0.3, "flops") and not q.done(0.3, "flops", after(n - 1))


def test_one_shot_taylor_so_and_oracle_units():
    model, x, y = _small_cnn()
    for crit in ("taylor_so", "oracle", "taylor_fo_weight"):
        p = StructuredPruner(model, x[:1], crit)
        assert p.one_shot([(x, y)], 0.25, target_kind="units") == round(0.25 * p.total_units)
        with torch.no_grad():
            assert torch.isfinite(model(x)).all()
        p.remove_gates()


def test_per_group_masks_uniform():
    scores = {"a": torch.tensor([3.0, 1.0, 2.0, 0.5]), "b": torch.tensor([1.0, 2.0])}
    m = per_group_masks(scores, 0.5)
    assert m["a"].tolist() == [True, False, True, False]
    assert m["b"].tolist() == [False, True]
    assert per_group_masks({"c": torch.tensor([1.0, 2.0])}, 1.0)["c"].sum() == 1
