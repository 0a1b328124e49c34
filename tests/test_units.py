"""The units' ground floor (prunelab.pruning.units) and its seams: one site accepts each multiplier kind;
``finish`` -> MaskSet -> fine-tuning keeps pruned-but-unremovable units at exactly zero for all three
families; the one density schedule; the target each method reads; config inheritance; network slimming on
top of the units."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from prunelab.models import build_model
from prunelab.pipeline.run import run_pipeline
from prunelab.pruning.bayes import bmrs as B
from prunelab.pruning.bayes.bmrs_method import BMRSMethod
from prunelab.pruning.bayes.dllp import attach_gates
from prunelab.pruning.bayes.dllp_method import DLLPMethod
from prunelab.pruning.density import density_schedule, round_sparsities
from prunelab.pruning.method import check_target_options
from prunelab.pruning.structured.method import StructuredMethod
from prunelab.pruning.structured.slimming import SlimmingMethod
from prunelab.pruning.units.gates import Gates
from prunelab.pruning.units.groups import build_groups
from prunelab.pruning.units.sites import SiteHook, layer_sites, strip_site_hooks


# ----------------------------------------------------------------------------------------------- sites
def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.BatchNorm2d(6),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.uniform_(0.5, 1.0)  # a non-zero shift: a gate before the norm would not zero the unit
    return net.eval()


def _channel(net: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    seen = {}
    h = net.get_submodule(name).register_forward_hook(lambda m, i, o: seen.setdefault("o", o.detach().clone()))
    try:
        net(x)
    finally:
        h.remove()
    return seen["o"]


def test_layer_sites_find_norm_and_activation():
    net = _bn_net()
    sites = layer_sites(net)
    assert [(s.layer, s.norm, s.activation, s.units) for s in sites] == [("0", "1", "2", 8), ("3", "4", "5", 6)]
    assert sites[0].position("norm_or_layer") == "1" and sites[0].position("layer") == "0"


class OutOfOrderMLP(nn.Module):
    """Hidden modules registered in another order than the forward pass uses them (the classifier last)."""

    def __init__(self):
        super().__init__()
        self.act_b = nn.Tanh()       # follows fc_b
        self.fc_b = nn.Linear(8, 6)
        self.act_a = nn.ReLU()       # follows fc_a
        self.fc_a = nn.Linear(4, 8)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(self.act_b(self.fc_b(self.act_a(self.fc_a(x)))))


class OutOfOrderConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn2 = nn.BatchNorm2d(6)  # follows conv2
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3)
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))).flatten(1))


def test_sites_follow_the_forward_pass_when_given_an_example():
    mlp, x = OutOfOrderMLP(), torch.randn(2, 4)
    by_registration = {s.layer: s.activation for s in layer_sites(mlp)}
    assert by_registration == {"fc_b": "act_a", "fc_a": None}  # what registration order gets wrong
    assert {s.layer: s.activation for s in layer_sites(mlp, example=x)} == {"fc_a": "act_a", "fc_b": "act_b"}
    conv, xc = OutOfOrderConv(), torch.randn(2, 1, 8, 8)
    conv.train()
    assert {s.layer: s.norm for s in layer_sites(conv)}["conv2"] is None
    assert {s.layer: s.norm for s in layer_sites(conv, example=xc)} == {"conv1": "bn1", "conv2": "bn2"}
    assert conv.training and int(conv.bn2.num_batches_tracked) == 0  # the tracing pass changed nothing


def test_bmrs_noise_and_dllp_gates_sit_where_the_forward_pass_puts_them():
    mlp, x = OutOfOrderMLP(), torch.randn(2, 4)
    noises = B.insert_noise(mlp, "activation", example=x)
    assert {n: z.units for n, z in noises.items()} == {"act_a.bmrs_noise": 8, "act_b.bmrs_noise": 6}
    mlp(x)  # the noise of each activation has that activation's width
    B.remove_noise(mlp)
    mlp2 = OutOfOrderMLP()
    B.insert_noise(mlp2, "activation")  # registration order: fc_b's 6-unit noise after act_a's 8 units
    with pytest.raises(ValueError, match="6 units"):
        mlp2(x)
    conv, xc = OutOfOrderConv(), torch.randn(2, 1, 8, 8)
    dmodel = attach_gates(conv, "unit", "l2", 3, example=xc)
    assert {s.name: s.bn_name for s in dmodel.sites} == {"conv1": "bn1", "conv2": "bn2"}


def test_one_site_accepts_each_multiplier_kind():
    """The Taylor gate, BMRS noise and DLLP particle gates attach at the same site (after the BatchNorm of
    layer 0) through SiteHook; each zeroes unit 2 there when it prunes it, and stripping leaves the plain net."""
    x = torch.randn(2, 3, 10, 10)
    net = _bn_net()
    plain = net(x).detach()
    site = layer_sites(net)[0]
    assert _channel(net, site.norm, x)[:, 2].abs().sum() > 0
    # Taylor gate: one vector per group, placed at the group's norm-or-layer positions
    groups = build_groups(net, x)
    gates = Gates(net, groups)
    gid = next(g.id for g in groups if any(m.name == site.layer for m in g.producers()))
    assert site.norm in {s.name for g in groups for s in g.gates}
    gates.mask[gid][2] = False
    assert (_channel(net, site.norm, x)[:, 2] == 0).all() and (_channel(net, site.norm, x)[:, 3] != 0).any()
    gates.remove()
    # BMRS noise on the same site
    noises = B.insert_noise(net, "batchnorm")
    noise = noises[f"{site.norm}.bmrs_noise"]
    assert noise.site == site
    noise.mask[2] = False
    assert (_channel(net, site.norm, x)[:, 2] == 0).all()
    B.remove_noise(net)
    # DLLP particle gates on the same site (two particles: unit 2 off in particle 1 only)
    dm = attach_gates(net, n_particles=2).eval()
    assert dm.sites[0].site == site and dm.sites[0].hook_name == site.norm
    hooks = [h for h in net.get_submodule(site.norm)._forward_hooks.values() if isinstance(h, SiteHook)]
    assert len(hooks) == 1
    gates2 = {s.name: torch.ones(2, s.units) for s in dm.sites}
    gates2[site.layer][1, 2] = 0.0
    seen = []
    h = net.get_submodule("3").register_forward_pre_hook(lambda m, i: seen.append(i[0].detach()))
    dm.forward_gates(x, gates2)
    h.remove()
    inp = seen[0].unflatten(0, (2, -1))
    assert (inp[1, :, 2] == 0).all() and (inp[0, :, 2] != 0).any()
    dm._remove_hooks()
    assert strip_site_hooks(net) == 0
    torch.testing.assert_close(net(x), plain)


# ------------------------------------------------------------------------- finish -> MaskSet -> finetune
BAYES = ["schedule=bayesian", "schedule.epochs=1", "measure.latency=false"]


class PruneOneResidualProducer(pl.Callback):
    """At the start of the BMRS pruning stage, push every other unit of ONE residual producer (layer1.0.bn2)
    to the lower bound (pruned after the epoch), and every other unit of every block's first BatchNorm."""

    def on_train_start(self, trainer, module):
        if module.stage != "prune":
            return
        with torch.no_grad():
            for name, noise in B.find_noise(module.model).items():
                if name == "layer1.0.bn2.bmrs_noise" or name.endswith("bn1.bmrs_noise") and "layer" in name:
                    noise.mu[::2] = -19.5
                    noise.log_sigma[::2] = 1.0


def _finetuned(cfg) -> tuple[dict, dict, dict]:
    res = run_pipeline(cfg)
    stage = torch.load(Path(cfg.paths.output_dir) / "stages" / "finetune.pt", weights_only=False)
    prune = torch.load(Path(cfg.paths.output_dir) / "stages" / "prune.pt", weights_only=False)
    return res, stage, prune


def _check_zero_after_finetune(stage: dict, prune: dict) -> None:
    masks = stage["masks"]
    assert masks is not None and prune["masks"] is not None
    assert set(masks) == set(prune["masks"])  # the prune stage's MaskSet went to fine-tuning
    state, before = stage["model"], prune["module"].state_dict()
    for name, m in masks.items():
        assert bool((state[name][~m] == 0).all()), name
    # fine-tuning did train the network (so the zeros are enforced, not merely untouched)
    assert any(not torch.equal(state[k], before[k]) for k in masks)


@pytest.mark.slow
def test_bmrs_residual_units_stay_zero_through_finetune(make_cfg):
    cfg = make_cfg("model=resnet20", "method=bmrs_n", *BAYES, "finetune.epochs=2",
                   "+callbacks.part._target_=tests.test_units.PruneOneResidualProducer")
    res, stage, prune = _finetuned(cfg)
    info = res["stages"]["prune"]["method"]
    assert info["units_masked_not_removed"] > 0 and info["units_removed_physically"] > 0
    _check_zero_after_finetune(stage, prune)
    # the units are not held by any module of the network: the fine-tuned model is a plain one
    assert not B.find_noise(prune["module"]) and not any(
        isinstance(h, SiteHook) for m in prune["module"].modules() for h in m._forward_hooks.values())


@pytest.mark.slow
def test_dllp_residual_units_stay_zero_through_finetune(make_cfg):
    cfg = make_cfg("model=resnet20", "method=dllp", "schedule=train_prune", "schedule.epochs=1",
                   "method.particles=3", "method.decision=target", "prune.sparsity=0.5",
                   "method.reliability_batches=1", "measure.latency=false", "finetune.epochs=2")
    res, stage, prune = _finetuned(cfg)
    assert res["stages"]["prune"]["method"]["compaction"]["params_zero_masked"] > 0
    _check_zero_after_finetune(stage, prune)


def test_taylor_removes_every_pruned_unit_residual_included(make_cfg):
    """The structured (Taylor-family) method prunes whole dependency groups: every pruned unit (residual
    streams included) is removed physically, so its finish hands no MaskSet to fine-tuning. Random scores
    (seeded; the same on every machine) at half the units, so the stem's residual stream surely loses units
    (with taylor_fo at 30% whether it does depends on float details of the tiny trained net)."""
    cfg = make_cfg("model=resnet20", "method=random_structured", "method.target_kind=units", "method.amount=0.5",
                   "measure.latency=false")
    res, stage, prune = _finetuned(cfg)
    assert prune["masks"] is None and stage["masks"] is None
    removed = res["stages"]["prune"]["method"]["removed_per_layer"]
    assert removed["conv1"] > 0 and removed["conv1"] == removed["layer1.0.bn2"]  # the stem's residual stream


# ----------------------------------------------------------------------------------------------- density
@pytest.mark.parametrize("s,n", [(0.9, 3), (0.5, 1), (0.99, 7), (0.0, 2)])
def test_round_sparsities_are_the_geometric_rounds(s, n):
    assert round_sparsities(s, n) == [1.0 - (1.0 - s) ** (r / n) for r in range(1, n + 1)]  # bit for bit
    d = density_schedule(0.8, 0.1, 4)
    assert d[-1] == pytest.approx(0.1) and all(b / a == pytest.approx((0.1 / 0.8) ** 0.25) for a, b in zip([0.8] + d, d))
    with pytest.raises(ValueError, match="rounds"):
        density_schedule(1.0, 0.5, 0)


# ----------------------------------------------------------------------------------------------- targets
def test_each_method_declares_its_target_and_explicit_ignored_ones_fail():
    unset = OmegaConf.create({"sparsity": None, "compression": None})
    for method in (StructuredMethod(), BMRSMethod(), DLLPMethod(sparsity=0.5), SlimmingMethod()):
        check_target_options(method, unset)
    for method, own in ((StructuredMethod(criterion="l2_norm"), "method.amount"), (BMRSMethod(rule="bmrs_u"), None)):
        for opt, val in (("sparsity", 0.9), ("compression", 10)):
            prune = OmegaConf.create({"sparsity": None, "compression": None, opt: val})
            with pytest.raises(ValueError, match=rf"prune.{opt}={val} is ignored by method={method.name}.*"
                                                 r"allowed values for this method: null") as e:
                check_target_options(method, prune)
            assert (own or "threshold-free") in str(e.value)
    check_target_options(DLLPMethod(), OmegaConf.create({"sparsity": 0.5, "compression": None}))


# ----------------------------------------------------------------------------------------------- configs
def test_config_inheritance_resolves_to_the_full_options(make_cfg):
    base = OmegaConf.to_container(make_cfg("method=bmrs_n").method)
    for rule in ("bmrs_u", "snr", "expected_theta"):
        assert OmegaConf.to_container(make_cfg(f"method={rule}").method) == {**base, "rule": rule}
    cpu = OmegaConf.to_container(make_cfg("trainer=cpu").trainer)
    assert OmegaConf.to_container(make_cfg("trainer=gpu").trainer) == {**cpu, "accelerator": "gpu"}
    data = make_cfg("data=mnist", fast=False).data
    assert (data.batch_size, data.eval_batch_size, data.val_fraction, data.augment) == (128, 512, 0.1, False)


# ----------------------------------------------------------------------------------------------- slimming
def test_slimming_l1_gradient_is_lambda_sign_gamma():
    net = _bn_net().train()
    x = torch.randn(4, 3, 10, 10)
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([0.5, -0.2, 0.0, 1.0, -3.0, 0.1, 0.7, -0.4]))
    method = SlimmingMethod(sparsity=1e-3)
    _, hook = method.attach(SimpleNamespace(input_shape=(3, 10, 10)), net, None)
    assert hook.bns == [net[1], net[4]]
    net(x).sum().backward()
    before = [bn.weight.grad.clone() for bn in hook.bns]
    hook.after_backward(None, 0)  # added to the data gradient
    for bn, g0 in zip(hook.bns, before):
        torch.testing.assert_close(bn.weight.grad, g0 + 1e-3 * torch.sign(bn.weight.detach()), rtol=0, atol=0)
    for bn in hook.bns:  # the L1 term alone: exactly lambda * sign(gamma) (0 where gamma = 0)
        bn.weight.grad = torch.zeros_like(bn.weight)
    hook.after_backward(None, 0)
    assert torch.equal(net[1].weight.grad, 1e-3 * torch.tensor([1.0, -1.0, 0.0, 1.0, -1.0, 1.0, 1.0, -1.0]))
    # the same as the gradient of the penalty lambda * sum |gamma| by autograd
    gam = [bn.weight.detach().clone().requires_grad_(True) for bn in hook.bns]
    (1e-3 * sum(g.abs().sum() for g in gam)).backward()
    for bn, g in zip(hook.bns, gam):
        assert torch.equal(bn.weight.grad, g.grad)


def test_slimming_removes_the_smallest_gammas_globally():
    net = _bn_net()
    gammas = torch.randperm(14).float().add(1.0) * torch.tensor([1, -1] * 7)  # |gamma| 1..14, mixed signs
    with torch.no_grad():
        net[1].weight.copy_(gammas[:8])
        net[4].weight.copy_(gammas[8:])
    method = SlimmingMethod(amount=5, target_kind="units")
    ctx = SimpleNamespace(input_shape=(3, 10, 10))
    _, hook = method.attach(ctx, net, None)
    small, masks, info = method.finish(ctx, net, hook)
    assert masks is None and info["units_removed"] == 5
    kept = torch.cat([small[1].weight.detach(), small[4].weight.detach()]).abs().sort().values
    assert kept.tolist() == [float(v) for v in range(6, 15)]  # the five smallest |gamma| (1..5) are gone
    x = torch.randn(2, 3, 10, 10)
    assert small(x).shape == (2, 4)


@pytest.mark.slow
def test_slimming_pipeline(make_cfg):
    res = run_pipeline(make_cfg("model=resnet20", "method=slimming", "schedule=train_prune", "schedule.epochs=1",
                                "method.amount=0.25", "measure.latency=false"))
    info = res["stages"]["prune"]["method"]
    assert info["criterion"] == "bn_scale" and info["units_removed"] == round(0.25 * info["units_total"])
    assert res["final"]["params_after"] < res["final"]["params_before"]
    assert not math.isnan(res["final"]["test_acc"])


def test_registry_models_have_sites():
    for name, shape in (("lenet5", (1, 28, 28)), ("resnet20", (3, 32, 32)), ("vgg19", (3, 32, 32))):
        sites = layer_sites(build_model(name, shape, 10))
        assert sites and all(s.units > 1 for s in sites)
