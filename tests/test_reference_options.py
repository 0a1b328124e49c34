"""Options selecting the reference codes' behaviour, each against the reference's own formula:

* SNIP / GraSP ``train_mode=false``: BatchNorm in eval mode (running statistics) as in Tanaka et al.'s
  Synaptic-Flow code (``prune_loop``: ``model.eval()``); default ``true``: batch statistics as SNIP's and GraSP's
  reference codes (and Connectivity Matters' TF code, whose BN layers are called with ``training=True``).
* SynFlow ``linearize=linear`` (Vysogorets & Kempe's ``prune_synflow``) and ``count_rule=floor`` /
  ``kthvalue`` (Vysogorets & Kempe / Tanaka et al. ``_global_mask``).
* SP-KD ``positions=last`` (RepDistiller's SP: one feature, the last stage output).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from prunelab.finetune.overparam_strategy import OverParamSPKD
from prunelab.finetune.spkd import default_positions
from prunelab.models import build_model
from prunelab.pruning.allocation import GlobalAllocation, UniformAllocation
from prunelab.pruning.masks import MaskSet
from prunelab.pruning.pruner import prune
from prunelab.pruning.scorers.base import Scorer
from prunelab.pruning.scorers.grasp import GraSPScorer
from prunelab.pruning.scorers.snip import SNIPScorer
from prunelab.pruning.scorers.synflow import SynFlowScorer


# ------------------------------------------------------------------------------------- BatchNorm mode
class FrozenBN(nn.Module):
    """A BatchNorm2d in eval mode written out: the affine map of its running statistics (no batch statistics)."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        self.register_buffer("scale", scale.view(1, -1, 1, 1))
        self.register_buffer("shift", (bn.bias.detach() - bn.running_mean * scale).view(1, -1, 1, 1))

    def forward(self, x):
        return x * self.scale + self.shift


def _bn_net_with_running_stats() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 5 * 5, 3))
    net.train()
    with torch.no_grad():  # running statistics far from any single batch's statistics
        for _ in range(20):
            net(3.0 * torch.randn(16, 2, 5, 5) + 2.0)
    return net


def _frozen(net: nn.Module) -> nn.Module:
    out = copy.deepcopy(net)
    out[1] = FrozenBN(net[1])
    return out


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 2, 5, 5, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(2)]


@pytest.mark.parametrize("scorer_cls", [SNIPScorer, GraSPScorer])
def test_eval_mode_scores_use_the_running_statistics(scorer_cls):
    net = _bn_net_with_running_stats()
    frozen = _frozen(net)
    masks = MaskSet.from_model(net)
    names = [n for n in masks if not n.startswith("1.")]
    masks = MaskSet({n: masks[n] for n in names})
    batches = _batches()
    eval_scores = scorer_cls(num_batches=2, train_mode=False).score(net, masks, batches)
    train_scores = scorer_cls(num_batches=2, train_mode=True).score(net, masks, batches)
    # reference: the same scorer on the network whose BN is the fixed affine map of its running statistics
    ref = scorer_cls(num_batches=2, train_mode=True).score(frozen, masks, batches)
    for n in names:
        torch.testing.assert_close(eval_scores[n], ref[n], rtol=1e-5, atol=1e-9)
    assert any(not torch.allclose(eval_scores[n], train_scores[n], rtol=1e-3) for n in names)
    assert net.training  # mode restored


# ------------------------------------------------------------------------------------- SynFlow linearisation
def test_synflow_linear_matches_the_linear_path_formula():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                m.bias.uniform_(0.5, 1.0)  # biases matter for the abs linearisation, not for the linear one
    masks = MaskSet.from_model(net)
    w1, w2, w3 = (net[i].weight.detach().abs().double() for i in (1, 3, 5))
    one = torch.ones(6, dtype=torch.float64)
    ref = {  # R = 1^T |W3| |W2| |W1| 1: dR/dW_l = (1^T upstream)^T (downstream 1)^T, score = that * |W_l|
        "1.weight": torch.outer(torch.ones(3, dtype=torch.float64) @ w3 @ w2, one) * w1,
        "3.weight": torch.outer(torch.ones(3, dtype=torch.float64) @ w3, w1 @ one) * w2,
        "5.weight": torch.outer(torch.ones(3, dtype=torch.float64), w2 @ w1 @ one) * w3,
    }
    lin = SynFlowScorer(rounds=1, input_shape=[6], linearize="linear").score(net, masks)
    absm = SynFlowScorer(rounds=1, input_shape=[6]).score(net, masks)
    for n, r in ref.items():
        torch.testing.assert_close(lin[n].double(), r)
    assert not torch.allclose(absm["3.weight"].double(), ref["3.weight"])  # Tanaka's keeps |b| in the flow


def test_synflow_linear_replaces_max_pooling_by_average_pooling():
    torch.manual_seed(0)
    net = build_model("lenet5", (1, 16, 16), 4)  # max pooling
    masks = MaskSet.from_model(net)
    avg = build_model("lenet5", (1, 16, 16), 4, pool="avg")
    avg.load_state_dict(net.state_dict())
    # reference network: no ReLU, average pooling, |W|, zero biases
    ref_net = nn.Sequential(
        avg.features[0], avg.features[2], avg.features[3], avg.features[5], nn.Flatten(),
        avg.classifier[1], avg.classifier[3], avg.classifier[5]).double()
    with torch.no_grad():
        for m in ref_net:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.abs_()
                m.bias.zero_()
    params = {n: ref_net.get_parameter(f"{i}.weight") for n, i in
              zip(masks, (0, 2, 5, 6, 7))}
    flow = ref_net(torch.ones(1, 1, 16, 16, dtype=torch.float64)).sum()
    grads = torch.autograd.grad(flow, list(params.values()))
    scores = SynFlowScorer(rounds=1, input_shape=[1, 16, 16], linearize="linear").score(net, masks)
    for (n, p), g in zip(params.items(), grads):
        torch.testing.assert_close(scores[n].double(), (g * p).detach())
    assert isinstance(net.features[2], nn.MaxPool2d) and isinstance(net.features[1], nn.ReLU)  # model untouched


# ------------------------------------------------------------------------------------- per-round count rules
class DriftScorer(Scorer):
    """Deterministic scores that change from round to round (like SynFlow's), with many exact ties."""

    needs_data = False

    def __init__(self, rounds: int, count_rule: str):
        self.rounds, self.count_rule, self.t = rounds, count_rule, 0

    def score(self, model, masks, batches=()):
        self.t += 1
        out = {}
        for i, (n, m) in enumerate(masks.items()):
            g = torch.Generator().manual_seed(100 * self.t + i)
            s = torch.randint(1, 6, m.shape, generator=g).double()  # values 1..5: ties everywhere
            out[n] = s * m  # pruned weights score 0, as SynFlow's (their weight is 0)
        return out


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(13, 11), nn.ReLU(), nn.Linear(11, 7))


def _replay(rule: str, rounds: int, density: float, masks: MaskSet) -> MaskSet:
    """The reference loops, written from the reference codes."""
    ref = DriftScorer(rounds, rule)
    names = list(masks)
    flat_mask = torch.cat([masks[n].flatten() for n in names]).numpy().astype(float)
    n_all = flat_mask.size
    already = 0
    for t in range(1, rounds + 1):
        s = ref.score(None, MaskSet({n: torch.from_numpy(m.reshape(masks[n].shape) > 0) for n, m in
                                     zip(names, np.split(flat_mask, np.cumsum([masks[k].numel() for k in names])[:-1]))}))
        scores = torch.cat([s[n].flatten() for n in names]).numpy()
        d_t = density ** (t / rounds)
        if rule == "floor":  # Vysogorets & Kempe prune_synflow
            to_prune = int(n_all - n_all * d_t) - already
            already += to_prune
            order = scores.argsort(kind="stable")
            idx = order[np.isin(order, np.where(flat_mask == 1)[0])][:to_prune]
            flat_mask[idx] = 0.0
        else:  # Tanaka et al. _global_mask
            k = int((1.0 - d_t) * n_all)
            if k >= 1:
                thr = torch.kthvalue(torch.from_numpy(scores), k).values.item()
                flat_mask = np.where(scores <= thr, 0.0, 1.0)
    return flat_mask


@pytest.mark.parametrize("rule", ["floor", "kthvalue"])
def test_count_rules_replay_the_reference_loops(rule):
    rounds, density = 7, 0.05
    net = _net()
    masks = MaskSet.from_model(net)
    out = prune(net, masks, DriftScorer(rounds, rule), GlobalAllocation(), 1.0 - density)
    ref = _replay(rule, rounds, density, masks)
    got = torch.cat([out[n].flatten() for n in out]).numpy().astype(float)
    if rule == "kthvalue":
        np.testing.assert_array_equal(got, ref)  # the threshold rule is order-free: exact mask equality
    else:  # ties between equal scores may be broken differently: compare counts round by round (final here)
        assert got.sum() == ref.sum() == masks.numel() - int(masks.numel() - masks.numel() * density)
    rounded = prune(_net(), MaskSet.from_model(_net()), DriftScorer(rounds, "round"), GlobalAllocation(),
                    1.0 - density)
    assert got.sum() <= rounded.remaining()  # ties: Tanaka's rule may prune more than the count


class ConstantScorer(Scorer):
    needs_data = False

    def __init__(self, count_rule: str):
        self.rounds, self.count_rule = 1, count_rule

    def score(self, model, masks, batches=()):
        return {n: torch.ones(m.shape, dtype=torch.float64) for n, m in masks.items()}


def test_kthvalue_prunes_every_tie_of_the_threshold():
    # all scores equal: the k-th smallest is that value and "score <= threshold" prunes everything (Tanaka's
    # _global_mask); the counting rules keep exactly their count
    n = MaskSet.from_model(_net()).numel()
    out = {r: prune(_net(), MaskSet.from_model(_net()), ConstantScorer(r), GlobalAllocation(), 0.5).remaining()
           for r in ("kthvalue", "round", "floor")}
    assert out == {"kthvalue": 0, "round": round(n * 0.5), "floor": n - int(n - n * 0.5)}


def test_floor_and_round_counts_differ_where_the_formulas_do():
    n = 13 * 11 + 11 * 7
    density = 0.01
    assert round(n * density) != n - int(n - n * density)  # 2 vs 3 for n = 220
    a = prune(_net(), MaskSet.from_model(_net()), DriftScorer(1, "round"), GlobalAllocation(), 1 - density)
    b = prune(_net(), MaskSet.from_model(_net()), DriftScorer(1, "floor"), GlobalAllocation(), 1 - density)
    assert (a.remaining(), b.remaining()) == (round(n * density), n - int(n - n * density))


def test_count_rule_errors_name_the_option():
    with pytest.raises(ValueError, match=r"method.count_rule='ceil'; allowed values: round, floor, kthvalue"):
        SynFlowScorer(count_rule="ceil")
    with pytest.raises(ValueError, match=r"method.linearize='relu'; allowed values: abs, linear"):
        SynFlowScorer(linearize="relu")
    with pytest.raises(ValueError, match="allocation=global"):
        prune(_net(), MaskSet.from_model(_net()), DriftScorer(2, "kthvalue"), UniformAllocation(), 0.5)


# ------------------------------------------------------------------------------------- SP-KD positions
def test_spkd_last_is_the_last_stage_output():
    lenet = build_model("lenet5", (1, 28, 28), 10)
    assert default_positions(lenet, "stages") == ["features.1", "features.4"]
    assert default_positions(lenet, "last") == ["features.4"]
    resnet = build_model("resnet20", (3, 32, 32), 10)
    assert default_positions(resnet, "last") == [default_positions(resnet, "stages")[-1]] == ["layer3"]
    with pytest.raises(ValueError, match=r"finetune.positions='first'; allowed values: stages, last, expanded"):
        OverParamSPKD(positions="first")


# ------------------------------------------------------------------------------------- BMRS App. C
# The paper's App. C (Wright, Igel, Selvan 2024): (model, data) -> (hidden widths or None, batch size, Adam lr).
BMRS_APP_C = {
    "mlp_mnist": ([100] * 7, 128, 8.5e-4), "mlp_fashion_mnist": ([150], 128, 1.5e-3),
    "mlp_cifar10": ([150] * 5, 32, 6.8e-4), "lenet5_mnist": ((6, 16, 120, 84), 128, 1.4e-3),
    "lenet5_fashion_mnist": ((6, 16, 120, 84), 32, 1.4e-3),
    "lenet5_cifar10": ((18, 48, 360, 252), 64, 1.0e-3),  # the authors' 3-channel LeNet-5: every width x3
}


@pytest.mark.parametrize("setting", sorted(BMRS_APP_C))
def test_bmrs_overlays_select_the_papers_settings(setting, make_cfg):
    """Each BMRS overlay selects its reference's settings: App. C batch size and learning rate, Adam without
    weight decay, constant LR, 50 + 10 epochs, 80/20 train/val split, best-validation fine-tuning, the
    authors' Tanh MLP, LeNet-5 as 6-16-120-84 (x3 on CIFAR-10 as in the authors' code), Delta F_N as the
    released code computes it."""
    hidden, batch, lr = BMRS_APP_C[setting]
    cfg = make_cfg(f"experiment=bmrs_{setting}", fast=False)
    assert cfg.data.batch_size == batch and cfg.data.val_fraction == 0.2
    for stage in (cfg.pretrain, cfg.finetune):
        assert stage.optimizer.name == "adam" and stage.optimizer.lr == pytest.approx(lr)
        assert stage.optimizer.weight_decay == 0.0 and stage.scheduler.name == "constant"
    assert (cfg.schedule.epochs, cfg.finetune.epochs, cfg.finetune.keep_best) == (50, 10, True)
    assert cfg.method.delta_f_n == "code" and cfg.method.log_a == -20.0
    if isinstance(hidden, tuple):
        assert cfg.model.name == "lenet5" and (*cfg.model.channels, *cfg.model.fc) == hidden
    else:
        assert cfg.model.name == "mlp" and list(cfg.model.hidden) == hidden and cfg.model.activation == "tanh"


def test_bmrs_rules_use_the_app_c_constants():
    """The rules' constants are App. C's: BMRS_N with sigma~^2 = 1e-12, BMRS_U with [2^-23, 2^-p], SNR pruned at
    or below 1, E[theta] at or below 0.1 (each decision checked on both sides of its threshold)."""
    import math

    from prunelab.pruning.bayes import lognormal as ln
    from prunelab.pruning.bayes.bmrs import LogNormalNoise, delta_f_n, delta_f_u, prune_scores

    noise = LogNormalNoise(400, log_a=-20.0, log_b=0.0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        noise.mu.copy_(torch.linspace(-8.0, 1.0, 400))
        noise.log_sigma.copy_(torch.empty(400).uniform_(-3.0, 1.0, generator=gen))
    mu, sigma = noise.posterior64()
    e, snr = ln.expected_theta(mu, sigma, -20.0, 0.0), ln.snr(mu, sigma, -20.0, 0.0)
    assert ((e < 0.1).any() and (e > 0.1).any()) and ((snr < 1).any() and (snr > 1).any())
    assert torch.equal(prune_scores(noise, "expected_theta") >= 0, e <= 0.1)
    assert torch.equal(prune_scores(noise, "snr") >= 0, snr <= 1)
    torch.testing.assert_close(prune_scores(noise, "bmrs_n"), delta_f_n(mu, sigma, -20.0, 0.0, var_p=1e-12, variant="code"))
    assert not torch.allclose(prune_scores(noise, "bmrs_n"), delta_f_n(mu, sigma, -20.0, 0.0, var_p=1e-6, variant="code"))
    for p in (8, 4):
        torch.testing.assert_close(prune_scores(noise, "bmrs_u", p=p),
                                   delta_f_u(mu, sigma, -20.0, 0.0, p=p, log_a_prime=-23 * math.log(2.0)))


@pytest.mark.parametrize("net", ["lenet_mnist", "lenet_fashion_mnist", "vgg19_cifar100", "resnet18_tiny"])
def test_connectivity_overlays_compute_synflow_as_the_papers_code(net, make_cfg):
    cfg = make_cfg(f"experiment=connectivity_{net}", fast=False)
    assert cfg.method._target_.endswith("SynFlowScorer")
    assert (cfg.method.linearize, cfg.method.count_rule) == ("linear", "floor")
    assert (make_cfg("method=synflow").method.linearize, make_cfg("method=synflow").method.count_rule) == ("abs", "round")
