"""BMRS through the pipeline (method=bmrs_n/bmrs_u/snr/expected_theta, schedule=bayesian): config
composition, results.json fields, resume of an interrupted pruning stage, folding + physical removal equal to
the masked model, no weight decay on the noise, continuous mask recomputation, option errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunelab.models import build_model
from prunelab.pipeline.run import run_pipeline
from prunelab.pruning.bayes import bmrs as B
from prunelab.pruning.bayes.bmrs_method import BMRSHook, BMRSMethod, compact_folded, fold_noise, noise_sites
from tests.helpers import check_pruned_beats_random, surplus_units_problem

BAYES = ["schedule=bayesian", "schedule.epochs=2", "measure.latency=false", "finetune.keep_best=true"]


class PrunePart(pl.Callback):
    """Test helper: at the start of the pruning stage, move the posterior of every other unit of every noise
    to where the method's rule prunes it (near the lower bound: mu = -19.5, sigma = e; for bmrs_u inside the
    reduced support [2^-23, 2^-8]: mu = -11, sigma = 1), so those units are pruned after the first epoch."""

    def on_train_start(self, trainer, module):
        if module.stage != "prune":
            return
        mu, log_sigma = (-11.0, 0.0) if module.hook.pruner.rule == "bmrs_u" else (-19.5, 1.0)
        with torch.no_grad():
            for noise in B.find_noise(module.model).values():
                noise.mu[::2] = mu
                noise.log_sigma[::2] = log_sigma


PART = ["+callbacks.part._target_=tests.test_bmrs_pipeline.PrunePart"]


# ------------------------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize("rule", ["bmrs_n", "bmrs_u", "snr"])
def test_pipeline_records_rule_variant_and_fractions(make_cfg, rule):
    cfg = make_cfg("model=mlp", "model.hidden=[32,32]", f"method={rule}", *BAYES, *PART)
    assert cfg.method.rule == rule and cfg.schedule.epochs == 2 and cfg.schedule.pretrained is False
    res = run_pipeline(cfg)
    final, info = res["final"], res["stages"]["prune"]["method"]
    assert final["rule"] == rule == final["target"] and final["sparsity_target"] is None
    assert final["delta_f_n_variant"] == "code"  # the default: the authors' released code
    # every other unit was pushed to the lower bound: all three rules prune exactly those 2 x 16 units
    assert final["units_total"] == 64 and final["units_removed"] == 32
    assert final["frac_units_removed"] == pytest.approx(0.5)
    # params owned by the removed units: rows + biases + next layer's columns + 2 noise params each
    # (784->32->32->10: layer 1 units own 784+1+2 and 32 columns of the next layer, shared columns counted once)
    n_noisy = 784 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10 + 4 * 32
    removed = 16 * (784 + 1 + 2) + 16 * (32 + 1 + 2 + 10) + 16 * 16
    assert info["params_removed"] == removed
    assert final["frac_params_removed"] == pytest.approx(removed / n_noisy)
    # the authors' count (their "Comp %"): the same without the 32 pruned units' biases
    assert final["frac_params_removed_authors"] == pytest.approx((removed - 32) / n_noisy)
    # physically removed: the compact network is what fine-tuning trained and what was measured
    dense = 784 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10
    small = 784 * 16 + 16 + 16 * 16 + 16 + 16 * 10 + 10
    assert final["params_before"] == dense and final["params_after"] == small
    assert info["units_removed_physically"] == 32 and info["compact_max_abs_diff"] < 1e-5
    assert res["stages"]["prune"]["metrics"]["prune/bmrs/frac_units_removed"] == pytest.approx(0.5)
    assert [h["epoch"] for h in info["history"]] == [0, 1] and all(h["ranks_agree"] for h in info["history"])
    model = torch.load(Path(cfg.paths.output_dir) / "model_compact.pt", weights_only=False)
    assert sum(p.numel() for p in model.parameters()) == small
    assert not B.find_noise(model)


def test_pipeline_without_forced_pruning_and_paper_delta_f(make_cfg):
    res = run_pipeline(make_cfg("model=lenet5", "method=bmrs_n", "method.delta_f_n=paper",
                                "method.kl_scaling=elbo", *BAYES))
    assert res["final"]["delta_f_n_variant"] == "paper"
    assert res["stages"]["prune"]["method"]["kl_scaling"] == "elbo"
    assert 0.0 <= res["final"]["frac_units_removed"] <= 1.0


def test_resume_interrupted_prune_stage(make_cfg, tmp_path):
    over = ["model=mlp", "model.hidden=[32]", "method=bmrs_n", *BAYES, "schedule.epochs=3", *PART]
    cfg = make_cfg(*over, "+callbacks.interrupt._target_=tests.helpers.Interrupt",
                   "+callbacks.interrupt.stage=prune", "+callbacks.interrupt.epoch=2")
    with pytest.raises(RuntimeError, match="simulated pre-emption"):
        run_pipeline(cfg)
    last = tmp_path / "run" / "checkpoints" / "prune" / "last.ckpt"
    ck = torch.load(last, weights_only=False)
    assert ck["epoch"] == 1
    hook_state = ck["prunelab_hook"]
    assert [h["epoch"] for h in hook_state["history"]] == [0, 1]
    (mask,) = hook_state["masks"].values()
    assert mask.sum() == 16  # the forced half is pruned and saved
    assert any(k.endswith("bmrs_noise.mu") for k in ck["state_dict"])
    res = run_pipeline(make_cfg(*over))
    hist = res["stages"]["prune"]["method"]["history"]
    assert [h["epoch"] for h in hist] == [0, 1, 2]  # epochs 0-1 restored from the checkpoint, 2 run now
    assert res["final"]["units_removed"] == 16
    assert not last.exists()


def test_bad_options_raise_naming_option_and_values(make_cfg, tmp_path):
    for opt, val, allowed in [("rule", "magnitude", "bmrs_n"), ("kl_scaling", "sum", "layer_mean"),
                              ("placement", "everywhere", "batchnorm")]:
        with pytest.raises(ValueError, match=f"method.{opt}=.*allowed values:.*{allowed}"):
            BMRSMethod(**{opt: val})
    with pytest.raises(ValueError, match="method.p="):
        BMRSMethod(rule="bmrs_u", p=30)
    with pytest.raises(ValueError, match="method.log_a="):
        BMRSMethod(log_a=1.0)
    with pytest.raises(ValueError, match="method.rule='nope'"):
        run_pipeline(make_cfg("method=bmrs_n", "method.rule=nope", *BAYES))
    with pytest.raises(ValueError, match="schedule=oneshot cannot run method=bmrs_u"):
        run_pipeline(make_cfg("method=bmrs_u", "schedule=oneshot", output_dir=tmp_path / "b"))


# ------------------------------------------------------------------------------------------- components


def _noisy(name, shape, seed=0):
    torch.manual_seed(seed)
    name, _, activation = name.partition(":")
    model = build_model(name, shape, 10, **({"activation": activation} if activation else {}))
    noises = B.insert_noise(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n in noises.values():  # a spread of posteriors, ~40 % of the units pruned by BMRS_N
            n.mu.copy_(torch.empty(n.units).uniform_(-21, 0, generator=g))
            n.log_sigma.copy_(torch.empty(n.units).uniform_(-3, 1, generator=g))
    for m in model.modules():  # non-trivial BatchNorm statistics and affine parameters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.5, 0.5, generator=g)
    return model, noises


@pytest.mark.parametrize("name,shape", [("mlp", (1, 28, 28)), ("mlp:tanh", (1, 28, 28)), ("lenet5", (1, 28, 28)),
                                        ("resnet20", (3, 32, 32))])
def test_fold_and_compact_equal_the_masked_model(name, shape):
    model, noises = _noisy(name, shape)
    pr = B.BMRSPruner(noises, "bmrs_n")
    masks = pr.update_masks()
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert 0 < pruned < sum(m.numel() for m in masks.values())
    model.eval()
    x = torch.randn(8, *shape)
    with torch.no_grad():
        expected = model(x)
    B.remove_noise(model)
    sites = noise_sites(model, noises)
    # after a Tanh the factor goes into the readers' columns (it cannot pass back through the non-linearity)
    assert {v["into"] for v in sites.values()} == ({"columns"} if name == "mlp:tanh" else {"rows"})
    fold_noise(model, noises, sites, x[:2])
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    small, left, info = compact_folded(model, masks, noises, x[:2])
    small.eval()
    with torch.no_grad():
        got = small(x)
    assert (got - expected).abs().max() < 1e-5
    n_small = sum(p.numel() for p in small.parameters())
    assert n_small < sum(p.numel() for p in model.parameters())
    if name == "resnet20":
        # residual-coupled units: removed only where every coupled noise prunes them, the rest masked to zero
        assert info["units_masked_not_removed"] > 0 and left is not None
        assert info["units_removed_physically"] + info["units_masked_not_removed"] <= pruned
    else:
        assert info["units_removed_physically"] == pruned and info["units_masked_not_removed"] == 0
        assert left is None
        return
    # the masked channels stay at zero while training with the pipeline's enforcement (masked gradients
    # before the step, masked weights after it) -- and only because of it
    bns = {n: m for n, m in left.items() if n.endswith("bn2.weight") or n.endswith("bn1.weight")}
    assert bns and all(bool((small.get_parameter(n)[~m] == 0).all()) for n, m in bns.items())
    free = copy.deepcopy(small)
    for net, enforce in ((small, True), (free, False)):
        net.train()
        opt = torch.optim.SGD(net.parameters(), lr=0.1, weight_decay=0.0)
        F.cross_entropy(net(x), torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(0))).backward()
        if enforce:
            left.mask_grads(net)
        opt.step()
        if enforce:
            left.apply(net)
    assert all(bool((small.get_parameter(n)[~m] == 0).all()) for n, m in left.items())
    assert any(bool((free.get_parameter(n)[~m] != 0).any()) for n, m in left.items())


def test_fold_and_compact_after_sigmoid_and_gelu():
    """Noise after any activation: Sigmoid and GELU (not positively homogeneous, like Tanh) fold into the readers'
    columns, and the folded and the compacted networks equal the noisy one in eval mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(20, 16), nn.Sigmoid(), nn.Linear(16, 12), nn.GELU(),
                          nn.Linear(12, 5))
    noises = B.insert_noise(model)
    assert sorted(n.attached_to for n in noises.values()) == ["2", "4"]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in noises.values():
            n.mu.copy_(torch.empty(n.units).uniform_(-21, 0, generator=g))
            n.log_sigma.copy_(torch.empty(n.units).uniform_(-3, 1, generator=g))
    masks = B.BMRSPruner(noises, "bmrs_n").update_masks()
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert 0 < pruned < 28
    model.eval()
    x = torch.randn(8, 20)
    with torch.no_grad():
        expected = model(x)
    B.remove_noise(model)
    sites = noise_sites(model, noises)
    assert {v["into"] for v in sites.values()} == {"columns"}
    fold_noise(model, noises, sites, x[:2])
    small, left, info = compact_folded(model, masks, noises, x[:2])
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(small.eval()(x), expected, atol=1e-5, rtol=1e-5)
    assert info["units_removed_physically"] == pruned and left is None


def test_folding_a_tanh_noise_into_the_producer_would_be_wrong():
    """The seam the columns fold exists for: scaling the rows before a Tanh changes the function (so the test
    above would fail with the ReLU rule), scaling the readers' columns does not."""
    model, noises = _noisy("mlp:tanh", (1, 28, 28))
    model.eval()
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
    B.remove_noise(model)
    sites = noise_sites(model, noises)
    rows = {n: dict(v, into="rows") for n, v in sites.items()}
    wrong = copy.deepcopy(model)
    fold_noise(wrong, noises, rows)
    with torch.no_grad():
        assert (wrong(x) - expected).abs().max() > 1e-2


def test_pipeline_tanh_mlp_as_the_authors(make_cfg):
    """The authors' MLP (Tanh): noise after the Tanh, folded forward, compacted, fine-tuned."""
    res = run_pipeline(make_cfg("model=mlp", "model.hidden=[32]", "model.activation=tanh", "method=bmrs_n",
                                *BAYES, *PART))
    info = res["stages"]["prune"]["method"]
    assert res["final"]["units_removed"] == 16
    assert info["fold_max_abs_diff"] < 1e-4 and info["compact_max_abs_diff"] < 1e-4
    assert [v["fold_into"] for v in info["layers"].values()] == ["columns"]


def test_noise_parameters_have_no_weight_decay():
    model, noises = _noisy("lenet5", (1, 28, 28))
    hook = BMRSHook(B.BMRSPruner(noises))
    groups = hook.param_groups(model)
    noise_params = {id(p) for n in noises.values() for p in (n.mu, n.log_sigma)}
    assert {id(p) for p in groups[1]["params"]} == noise_params and groups[1]["weight_decay"] == 0.0
    assert not noise_params & {id(p) for p in groups[0]["params"]}
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))
    from prunelab.pipeline.optim import build_optimizer

    opt = build_optimizer(groups, {"name": "sgd", "lr": 0.1, "weight_decay": 0.5})
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]
    # with zero gradients only weight decay moves parameters: the noise stays put, the weights shrink
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        if "bmrs_noise" in n:
            assert torch.equal(p, before[n]), n
        elif before[n].abs().sum() > 0:
            assert not torch.equal(p, before[n]), n


class _FakeModule:
    def __init__(self, model):
        self.model, self.current_epoch, self.device = model, 0, torch.device("cpu")

    def all_reduce_mean(self, t):
        return t

    def check_ranks_agree(self, signature, what):
        return True


def test_masks_recomputed_every_epoch_and_units_come_back():
    model, noises = _noisy("mlp", (1, 28, 28))
    hook = BMRSHook(B.BMRSPruner(noises, "bmrs_n", model=model))
    fake = _FakeModule(model)
    noise = next(iter(noises.values()))
    with torch.no_grad():
        noise.mu[:5], noise.log_sigma[:5] = -19.5, 0.0
        noise.mu[5:10], noise.log_sigma[5:10] = 0.0, -5.0
    hook.on_epoch_end(fake)
    assert not noise.mask[:5].any() and noise.mask[5:10].all()
    with torch.no_grad():  # the data pull units 0-1 back up; units 5-6 collapse to the lower bound
        noise.mu[:2], noise.log_sigma[:2] = 0.0, -5.0
        noise.mu[5:7], noise.log_sigma[5:7] = -19.5, 0.0
    fake.current_epoch = 1
    metrics = hook.on_epoch_end(fake)
    assert noise.mask[:2].all() and not noise.mask[2:5].any() and not noise.mask[5:7].any()
    assert metrics["bmrs/units_kept"] == float(sum(int(n.mask.sum()) for n in noises.values()))
    assert [h["epoch"] for h in hook.history] == [0, 1]
    state = hook.state_dict()
    other = BMRSHook(B.BMRSPruner(B.insert_noise(build_model("mlp", (1, 28, 28), 10)), "bmrs_n"))
    other.load_state_dict(state)
    assert all(torch.equal(other.noises[n].mask, noises[n].mask) for n in noises)
    assert other.history == hook.history


def test_surplus_units_removed_at_little_cost_and_better_than_random():
    """The issue's property test, through BMRSHook's loss (layer-mean KL, as in the pipeline by default): a
    20-64-2 ReLU MLP on data with 2 informative dims; BMRS_U removes surplus units with accuracy within about
    a point of the unpruned network, and removing its Delta F >= 0 set hurts far less than as many random units."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is ~10x faster than contended ones
    try:
        _surplus_units()
    finally:
        torch.set_num_threads(threads)


def _surplus_units() -> None:
    model, (xtr, ytr, xte, yte) = surplus_units_problem()
    method = BMRSMethod(rule="bmrs_u")
    ctx = type("Ctx", (), {"datamodule": None})()
    model, hook = method.attach(ctx, model, None)
    fake = _FakeModule(model)
    opt = torch.optim.Adam(hook.param_groups(model), lr=0.03)
    for step in range(600):
        idx = torch.randint(0, 1024, (128,))
        loss, _ = hook.loss(fake, xtr[idx], ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 99:
            fake.current_epoch = step // 100
            hook.on_epoch_end(fake)
    noise = hook.noises["1.bmrs_noise"]
    check_pruned_beats_random(model, noise, noise.mask.clone(), xte, yte, acc_tol=0.015)


def test_results_json_written(make_cfg, tmp_path):
    cfg = make_cfg("model=mlp", "model.hidden=[16]", "method=expected_theta", *BAYES, *PART)
    run_pipeline(cfg)
    res = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert res["final"]["rule"] == "expected_theta" and res["final"]["units_removed"] == 8
    assert res["config"]["method"]["_target_"].endswith("BMRSMethod")


# ------------------------------------------------------------------- the authors' L2 baseline (rule l2_norm)


@pytest.mark.parametrize("name", ["lenet_300_100", "lenet5"])
def test_trained_l2_cuts_once_at_the_end_as_the_authors_percentile(name):
    """rule=l2_norm prunes nothing while training; at freeze it keeps ``norm > np.percentile(all norms, 100 a)``
    with the norms of every Linear/Conv's rows but the classifier's, taken over the whole network (the
    authors' get_weight_l2 + get_threshold + LogUniformL2NormPruningLayer.compress, written out here in numpy)."""
    import numpy as np

    model, noises = _noisy(name, (1, 28, 28))
    producers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][:-1]
    with torch.no_grad():  # one layer much smaller: a global threshold takes most of the cut from it
        producers[1].weight.mul_(0.05)
    norms = [np.linalg.norm(m.weight.detach().numpy().reshape(m.weight.shape[0], -1).astype(np.float64), axis=1)
             for m in producers]
    amount = 0.3
    t = np.percentile(np.concatenate(norms), 100 * amount)
    pruner = B.BMRSPruner(noises, "l2_norm", model=model, amount=amount)
    assert all(m.all() for m in pruner.update_masks().values())  # no cut while training
    masks = list(pruner.freeze().values())
    assert [m.numpy().tolist() for m in masks] == [(n > t).tolist() for n in norms]
    total = sum(len(n) for n in norms)
    # linear interpolation at position a (n - 1) of the sorted norms: floor(a (n - 1)) + 1 units at or below it
    cut = int(amount * (total - 1)) + 1
    assert sum(int((~m).sum()) for m in masks) == int(np.sum(np.concatenate(norms) <= t)) == cut
    assert int((~masks[1]).sum()) == min(len(norms[1]), cut)  # the small layer goes first
    pruner.update_masks()  # frozen: nothing moves
    assert [m.numpy().tolist() for m in pruner.masks().values()] == [(n > t).tolist() for n in norms]


class CaptureNorms(pl.Callback):
    """Test helper: the incoming-weight norms of the noisy network when the pruning stage's training ends."""

    seen: dict = {}

    def on_train_end(self, trainer, module):
        if module.stage == "prune":
            CaptureNorms.seen = B.input_weight_norms(module.model, module.hook.noises)


def test_trained_l2_through_the_pipeline(make_cfg):
    cfg = make_cfg("model=mlp", "model.hidden=[32,32]", "method=bmrs_l2", "method.amount=0.25", *BAYES,
                   "+callbacks.norms._target_=tests.test_bmrs_pipeline.CaptureNorms")
    res = run_pipeline(cfg)
    final, info = res["final"], res["stages"]["prune"]["method"]
    # the cut is made on the trained weights, before folding, with one threshold over both layers
    norms = CaptureNorms.seen
    t = torch.quantile(torch.cat(list(norms.values())), 0.25)
    kept = {n: int((v > t).sum()) for n, v in norms.items()}
    assert sorted(kept.values()) != [24, 24]  # a per-layer cut would keep 24 of each layer's 32
    assert {n: v["kept"] for n, v in info["layers"].items()} == kept
    assert final["rule"] == final["target"] == "l2_norm" and info["amount"] == 0.25
    assert [h["frac_units_removed"] for h in info["history"]] == [0.0, 0.0]  # trained with the noise, uncut
    assert final["units_removed"] == 16 and final["frac_units_removed"] == pytest.approx(0.25)
    assert info["units_removed_physically"] == 16 and info["compact_max_abs_diff"] < 1e-5


def test_trained_l2_amount_is_required_and_only_for_it(make_cfg):
    with pytest.raises(ValueError, match=r"method.amount=0.5 with method.rule=bmrs_n"):
        BMRSMethod(rule="bmrs_n", amount=0.5)
    with pytest.raises(ValueError, match=r"method.amount=1.5: the fraction of units to prune must be in \(0, 1\)"):
        BMRSMethod(rule="l2_norm", amount=1.5)
    with pytest.raises(ValueError, match=r"method.amount=None with method.rule=l2_norm"):
        run_pipeline(make_cfg("model=mlp", "method=bmrs_l2", *BAYES))


def _authors_removed(model: nn.Module) -> int:
    """The BMRS authors' get_num_removed_params (modules/layers.py), transcribed onto prunelab's noise modules
    (``mu`` and the ``mask`` buffer): zero the pruned rows and, where the shapes line up, the next matrix's
    columns, then count zeros in the weight matrices plus two noise parameters per pruned unit."""

    def connections(m):
        children = list(m.children())
        if children:
            return [c for ch in children for c in connections(ch)]
        return [(n, p.squeeze(), m) for n, p in m.named_parameters()
                if p.requires_grad and n not in ("bias", "log_sigma") and len(p.shape) > 1 or n == "mu"]

    model = copy.deepcopy(model)
    conns, weights, removed = connections(model), [], 0
    with torch.no_grad():
        for i, (n, p, m) in enumerate(conns):
            if n != "mu":
                weights.append(p)
                continue
            keep = m.mask.float().squeeze()
            removed += 2 * int((keep == 0).sum())
            conns[i - 1][1].mul_(keep.view([-1] + [1] * (conns[i - 1][1].ndim - 1)))
            if conns[i + 1][1].shape[1] == p.shape[0]:
                conns[i + 1][1].mul_(keep.view([1, -1] + [1] * (conns[i + 1][1].ndim - 2)))
    return removed + sum(int((w == 0).sum()) for w in weights)


@pytest.mark.parametrize("name", ["lenet_300_100", "lenet5", "mlp:tanh"])
def test_authors_parameter_count_is_their_code_and_lower_across_a_flatten(name):
    model, noises = _noisy(name, (1, 28, 28))
    g = torch.Generator().manual_seed(1)
    for noise in noises.values():
        noise.mask.copy_(torch.rand(noise.units, generator=g) > 0.6)
    removed, total = B.authors_params_removed(model, noises)
    assert removed == _authors_removed(model)
    assert total == sum(p.numel() for p in model.parameters() if p.requires_grad)
    ours = sum(int((~m).sum()) for m in B.param_masks(model, noises, example=torch.zeros(2, 1, 28, 28)).values())
    biases = sum(int((~n.mask).sum()) for n in noises.values())  # each pruned unit's bias: ours counts it
    if name == "lenet5":  # conv2 -> flatten -> fc1: the authors' code keeps counting the columns
        assert removed < ours - biases
    else:
        assert removed == ours - biases


def test_bmrs_table_backfills_the_authors_count_of_older_runs(make_cfg, tmp_path):
    """A run recorded before ``frac_params_removed_authors`` existed gets it from its rebuilt noisy model and
    per-layer counts, equal to what the pipeline records now; a wrong input shape is refused, not miscounted."""
    from tests.helpers import load_script

    cfg = make_cfg("model=lenet5", "method=bmrs_n", *BAYES, *PART)
    run_pipeline(cfg)
    path = Path(cfg.paths.output_dir) / "results.json"
    res = json.loads(path.read_text())
    recorded = res["final"].pop("frac_params_removed_authors")
    assert 0 < recorded < res["final"]["frac_params_removed"]  # LeNet-5: fewer, the columns after the flatten
    path.write_text(json.dumps(res))
    table = load_script("bmrs_table")
    runs, _ = table.labelled([str(tmp_path)])
    assert runs["params_removed_authors"].isna().all()
    filled = table.backfill_authors_count(runs.copy(), (1, 28, 28), 10)
    assert filled["params_removed_authors"].tolist() == pytest.approx([recorded], abs=1e-12)
    with pytest.raises(ValueError, match="does not give the recorded frac_params_removed.*--input-shape"):
        table.backfill_authors_count(runs.copy(), (1, 32, 32), 10)


@pytest.mark.parametrize("name", ["lenet_300_100", "lenet5"])
def test_zero_pruned_zeroes_what_the_authors_code_zeroes(name):
    """method.zero_pruned: the cut units' producer rows and, where the shapes line up, their reader columns are
    zero afterwards -- the same entries the authors' get_num_removed_params zeroes (the transcription above
    counts zeros after zeroing them itself; here nothing is left for it to zero) -- and nothing else is."""
    model, noises = _noisy(name, (1, 28, 28))
    g = torch.Generator().manual_seed(2)
    for noise in noises.values():
        noise.mask.copy_(torch.rand(noise.units, generator=g) > 0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    B.zero_cut_weights(model, noises)
    changed = sum(int((p != before[n]).sum()) for n, p in model.named_parameters())
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    zeros = sum(int((w == 0).sum()) for w in weights)
    cut_noise = 2 * sum(int((~n.mask).sum()) for n in noises.values())
    assert changed == zeros  # only cut entries moved, all of them to 0 (the weights had no zero before)
    assert zeros + cut_noise == _authors_removed(model) == B.authors_params_removed(model, noises)[0]
    if name == "lenet5":  # conv2 -> flatten -> fc1: the authors' code leaves fc1's columns alone
        fc1 = [m for m in model.modules() if isinstance(m, nn.Linear)][0]
        conv2, fc1_noise = list(noises.values())[1:3]
        assert int((~conv2.mask).sum()) > 0  # conv2 channels were cut ...
        # ... yet fc1 lost only the rows of its own cut units
        assert int((fc1.weight == 0).sum()) == fc1.weight.shape[1] * int((~fc1_noise.mask).sum())


def test_authors_per_epoch_l2_cut_sticks_and_the_final_cut_counts_it():
    """l2_epoch_threshold + zero_pruned (the authors' L2 layer under --compress_epochs 1): after an epoch every
    unit with incoming norm <= 0.5 is cut and zeroed, stays cut, and the final cut at ``amount`` ranks it at norm
    0, as the authors' final compress sees it."""
    model, noises = _noisy("lenet_300_100", (1, 28, 28))
    fc1 = model.get_submodule(next(iter(noises.values())).site.layer)
    with torch.no_grad():
        fc1.weight[:30] *= 0.5 / fc1.weight[:30].norm(dim=1, keepdim=True) * 0.9  # norm 0.45: cut
        fc1.weight[30:] *= 0.5 / fc1.weight[30:].norm(dim=1, keepdim=True) * 2.0  # norm 1.0: kept
    fc2 = model.get_submodule(list(noises.values())[1].site.layer)
    with torch.no_grad():  # layer 2 well above the threshold too, so that the epoch cut takes exactly the 30
        fc2.weight.mul_(1.0 / fc2.weight.norm(dim=1, keepdim=True))
    pruner = B.BMRSPruner(noises, "l2_norm", model=model, amount=0.2, l2_epoch_threshold=0.5)
    hook, fake = BMRSHook(pruner, zero_pruned=True), _FakeModule(model)
    hook.on_epoch_end(fake)
    first = next(iter(noises.values()))
    assert not first.mask[:30].any() and first.mask[30:].all()
    assert sum(int((~n.mask).sum()) for n in noises.values()) == 30
    assert (fc1.weight[:30] == 0).all() and (fc2.weight[:, :30] == 0).all()  # rows and the readers' columns
    with torch.no_grad():  # what Adam's stale moments do to a zeroed weight in the next epoch: a small drift
        fc1.weight[:30] += 1e-3 * torch.randn_like(fc1.weight[:30])
    fake.current_epoch = 1
    hook.on_epoch_end(fake)
    assert not first.mask[:30].any()  # near zero: still cut
    total = sum(n.units for n in noises.values())
    norms = torch.cat(list(B.input_weight_norms(model, noises).values()))
    masks = pruner.freeze()
    # the final cut at amount 0.2 (80 of the 400 units) ranks the 30 zeroed units lowest and adds 50 more
    assert int(0.2 * (total - 1)) + 1 == 80
    assert sum(int((~m).sum()) for m in masks.values()) == int((norms <= torch.quantile(norms, 0.2)).sum()) == 80
    assert not masks[next(iter(noises))][:30].any()


def test_zero_pruned_and_epoch_threshold_options_refused_where_they_do_not_apply():
    with pytest.raises(ValueError, match=r"method.l2_epoch_threshold=0.5 with method.rule=bmrs_n"):
        BMRSMethod(rule="bmrs_n", l2_epoch_threshold=0.5)
    with pytest.raises(ValueError, match=r"method.l2_epoch_threshold=-1 with method.rule=l2_norm: a norm > 0"):
        BMRSMethod(rule="l2_norm", amount=0.5, l2_epoch_threshold=-1)
    with pytest.raises(ValueError, match=r"method.zero_pruned='yes': allowed values: true, false"):
        BMRSMethod(zero_pruned="yes")
    model, noises = _noisy("resnet20", (3, 32, 32))  # noise after BatchNorm: no plain chain
    assert B.authors_params_removed(model, noises) is None
    with pytest.raises(NotImplementedError, match=r"noise after each activation \(MLPs, LeNets\)"):
        B.zero_cut_weights(model, noises)


def test_authors_l2_with_per_epoch_cut_through_the_pipeline(make_cfg):
    # PyTorch's default init gives every row an L2 norm near 1/sqrt(3) = 0.577: a threshold there cuts some
    # units of each layer after the first epoch, and they stay cut
    cfg = make_cfg("model=mlp", "model.hidden=[32,32]", "method=bmrs_l2", "method.amount=0.1",
                   "method.l2_epoch_threshold=0.577", "method.zero_pruned=true", *BAYES)
    res = run_pipeline(cfg)
    info, final = res["stages"]["prune"]["method"], res["final"]
    assert info["l2_epoch_threshold"] == 0.577 and info["zero_pruned"] is True
    cut = [h["frac_units_removed"] for h in info["history"]]
    assert 0 < cut[0] <= cut[1] < 1  # cut while training, and nothing came back
    assert final["frac_units_removed"] >= max(cut[1], 0.1) and info["compact_max_abs_diff"] < 1e-5
