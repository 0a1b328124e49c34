"""DLLP through the pipeline (method=dllp schedule=train_prune): results.json reliability fields, compaction
(smaller and equal to the masked network), resume of an interrupted prune stage, the hook's SVGD step
(W optimiser without particle logits, one particle = gradient ascent, DDP averaging), option errors."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from prunelab.models import build_model
from prunelab.pipeline.run import run_pipeline
from prunelab.pruning.bayes.dllp import DLLP, attach_gates
from prunelab.pruning.bayes.dllp_method import DLLPHook, DLLPMethod
from prunelab.pruning.bayes.svgd import svgd_direction_blocks
from prunelab.pruning.units.compact import compact_units

DLLP_RUN = ["method=dllp", "schedule=train_prune", "schedule.epochs=1", "method.particles=3",
            "measure.latency=false", "method.reliability_batches=1"]


def test_pipeline_end_to_end_unit_granularity(make_cfg):
    cfg = make_cfg("model=lenet5_caffe", *DLLP_RUN, "prune.sparsity=0.5", "method.decision=target")
    res = run_pipeline(cfg)
    final = res["final"]
    rec = res["stages"]["prune"]["method"]
    rel = rec["reliability"]
    # reliability in results.json: rho with its standard error, undecided fraction, per-particle sparsity,
    # ensemble metrics, particle accuracy mean/sd, deployed-vs-ensemble agreement
    for key in ("dllp_rho_se_mean", "dllp_undecided_fraction", "dllp_particle_sparsity_mean",
                "dllp_particle_sparsity_sd", "dllp_ensemble_acc", "dllp_ensemble_nll", "dllp_ensemble_brier",
                "dllp_ensemble_ece", "dllp_ensemble_entropy", "dllp_ensemble_mutual_info",
                "dllp_particle_acc_mean", "dllp_particle_acc_sd", "dllp_agreement", "dllp_deployed_acc",
                "dllp_posterior_shift", "dllp_posterior_mode_flip_fraction", "dllp_posterior_kl",
                "dllp_posterior_js", "dllp_particle_flip_fraction", "dllp_decision_vs_prior_fraction",
                "dllp_budget_lam"):
        assert isinstance(final[key], float) and math.isfinite(final[key]), key
    assert len(rel["particle_sparsity"]) == 3
    # how far the posterior moved from the prior, per layer and overall (defaults: taylor prior, W frozen)
    shift = rel["posterior_shift"]
    assert set(shift["layers"]) == set(rel["rho"]) and shift["mean_abs_diff"] == final["dllp_posterior_shift"]
    assert rec["prior"]["importance"] == "taylor" and rec["train_weights"] is False
    assert set(rel["rho"]) == set(rel["rho_se"]) and len(rel["rho"]) == 3   # every conv/linear but the output
    rho = torch.tensor([r for v in rel["rho"].values() for r in v])
    se = torch.tensor([s for v in rel["rho_se"].values() for s in v])
    assert torch.allclose(se, (rho * (1 - rho) / 3).sqrt(), atol=1e-9)
    assert ((rho * 3).round() - rho * 3).abs().max() < 1e-9          # rho is a fraction of 3 particles
    assert final["dllp_undecided_fraction"] == pytest.approx(float(((rho > 0.2) & (rho < 0.8)).double().mean()))
    # decision=target: exactly half of the gated units kept
    assert final["dllp_unit_sparsity"] == pytest.approx(0.5, abs=1 / final["dllp_units_total"])
    assert final["sparsity_target"] == 0.5 and final["target"] == "dllp_units"
    # the gate temperature reached its end value at the last step
    assert rec["history"][-1]["tau"] == pytest.approx(0.1)
    # physically smaller, and the compacted network equals the masked one
    assert final["params_after"] < final["params_before"]
    assert final["dllp_compact_max_abs_diff"] < 1e-5
    model = torch.load(Path(cfg.paths.output_dir) / "model_compact.pt", weights_only=False)
    assert sum(p.numel() for p in model.parameters()) == final["params_after"]
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def _residual_dllp(seed: int = 0) -> DLLP:
    torch.manual_seed(seed)
    net = build_model("resnet20", input_shape=(3, 16, 16), num_classes=5)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    dm = attach_gates(net, "unit", "l2", 4, target_density=0.5, generator=torch.Generator().manual_seed(seed))
    return DLLP(dm, n_train=100)


def test_compaction_residual_equals_masked_and_masks_hold():
    dllp = _residual_dllp()
    # prune every unit of the first stage's residual stream at every site, plus the decision of the particles
    keep = dllp.unit_masks(target_sparsity=0.5)
    dense = dllp.pruned_model(keep=keep).eval()
    x = torch.randn(6, 3, 16, 16)
    sites = [s.site for s in dllp.model.sites]
    small, left, info = compact_units(dense, {s.layer: keep[s.layer] for s in sites}, sites, x[:2])
    small.eval()
    with torch.no_grad():
        ref, out = dense(x), small(x)
    assert (ref - out).abs().max() < 1e-5
    n_dense = sum(p.numel() for p in dense.parameters())
    n_small = sum(p.numel() for p in small.parameters())
    assert n_small < n_dense and info["units_removed_physically"] > 0
    # residual-coupled channels pruned at some but not all sites stay, zero-masked, and stay zero when trained
    assert info["params_zero_masked"] > 0 and left is not None
    small.train()
    opt = torch.optim.SGD(small.parameters(), lr=0.1)
    small(x).logsumexp(-1).sum().backward()
    left.mask_grads(small)  # the fine-tuning step's enforcement (PruneModule)
    opt.step()
    left.apply(small)
    masked = [(m, small.get_parameter(n)) for n, m in left.items()]
    assert masked and all(bool((w[~mk] == 0).all()) for mk, w in masked)


def test_weight_granularity_pipeline_keeps_masks_through_finetune(make_cfg):
    cfg = make_cfg("model=mlp", *DLLP_RUN, "method.granularity=weight", "method.decision=target",
                   "prune.sparsity=0.7", "finetune.epochs=1")
    res = run_pipeline(cfg)
    final = res["final"]
    # 70% of the gated weights (all Linear layers but the output layer) removed, measured on the masks
    assert final["sparsity_direct"] == pytest.approx(0.7, abs=1e-3)
    assert final["dllp_unit_sparsity"] == pytest.approx(0.7, abs=1e-3)
    # after fine-tuning the pruned weights are still exactly zero
    stage = torch.load(Path(cfg.paths.output_dir) / "stages" / "finetune.pt", weights_only=False)
    state, masks = stage["model"], stage["masks"]
    assert set(masks) == {"1.weight"}  # the MaskSet handed from the prune stage to fine-tuning
    w = [state[k] for k in masks]
    assert all(bool((state[k][~m] == 0).all()) for k, m in masks.items())
    assert len(w) == 1  # the hidden layer (the output layer is never gated)
    zeros = sum(int((t == 0).sum()) for t in w) / sum(t.numel() for t in w)
    assert zeros == pytest.approx(0.7, abs=1e-3)


def test_resume_interrupted_prune_stage_matches_uninterrupted(make_cfg, tmp_path):
    over = ["model=mlp", *DLLP_RUN, "schedule.epochs=2", "prune.sparsity=0.5"]
    ref = run_pipeline(make_cfg(*over, output_dir=tmp_path / "ref"))
    cfg = make_cfg(*over, "+callbacks.interrupt._target_=tests.helpers.Interrupt",
                   "+callbacks.interrupt.stage=prune", "+callbacks.interrupt.epoch=1", output_dir=tmp_path / "r")
    with pytest.raises(RuntimeError, match="simulated pre-emption"):
        run_pipeline(cfg)
    last = tmp_path / "r" / "checkpoints" / "prune" / "last.ckpt"
    ck = torch.load(last, weights_only=False)
    assert ck["epoch"] == 0 and ck["prunelab_hook"]["z_opt"]["state"]  # the particles' Adam state travels
    res = run_pipeline(make_cfg(*over, output_dir=tmp_path / "r"))
    a, b = ref["stages"]["prune"]["method"], res["stages"]["prune"]["method"]
    assert a["reliability"]["particle_sparsity"] == b["reliability"]["particle_sparsity"]
    assert a["final"] == pytest.approx(b["final"])
    assert len(a["history"]) == len(b["history"]) == 2
    for ha, hb in zip(a["history"], b["history"]):
        assert ha == pytest.approx(hb)


# --------------------------------------------------------------------------------------------------------
# the hook's step
# --------------------------------------------------------------------------------------------------------
def _hook(n_particles: int, seed: int = 0) -> tuple[DLLPHook, DLLPMethod]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    method = DLLPMethod(particles=n_particles, sparsity=0.5, seed=seed)
    g = torch.Generator().manual_seed(seed)
    dm = SimpleNamespace(split=lambda name: (torch.zeros(500, 6), torch.zeros(500)),
                         score_batches=lambda n, bs=None: [(torch.randn(32, 6, generator=g),
                                                            torch.randint(0, 3, (32,), generator=g)) for _ in range(n)])
    ctx = SimpleNamespace(sparsity=0.5, datamodule=dm)
    model, hook = method.attach(ctx, net, SimpleNamespace(pretrained=True))
    return hook, method


def test_w_optimiser_excludes_particle_logits():
    hook, _ = _hook(4)
    groups = hook.param_groups(hook.model)
    ids = {id(p) for g in groups for p in g["params"]}
    particles = {id(p) for p in hook.dllp.particle_parameters()}
    assert not ids & particles
    assert ids == {id(p) for p in hook.model.model.parameters()}
    assert {id(p) for g in hook.z_opt.param_groups for p in g["params"]} == particles


def test_single_particle_hook_step_is_gradient_ascent():
    hook, _ = _hook(1)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    module = SimpleNamespace(model=hook.model, all_reduce_mean=lambda t: t)
    loss, logits = hook.loss(module, x, y)
    loss.backward()
    hook.after_backward(module, 0)
    got = [z.grad.clone() for z in hook.dllp.particle_parameters()]
    # reference: autograd of log p(z | D) = (N / B) log-lik + log prior, on a fresh forward
    zs = hook.dllp.particle_parameters()
    lp = hook.dllp.log_posterior(hook.model(x), y, n_train=500)
    want = torch.autograd.grad(lp.sum(), zs)
    for g, w in zip(got, want):
        assert torch.allclose(-g, w, rtol=1e-4, atol=1e-4)
    assert logits.shape == (16, 3) and loss.ndim == 0


def test_hook_direction_equals_controller_and_is_rank_averaged():
    hook, _ = _hook(5)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    zs = hook.dllp.particle_parameters()
    hook.dllp.svgd_step(hook.model(x), y, n_train=500)
    want = [z.grad.clone() for z in zs]
    module = SimpleNamespace(model=hook.model, all_reduce_mean=lambda t: t)
    hook.loss(module, x, y)
    hook.after_backward(module, 0)
    for z, w in zip(zs, want):
        assert torch.allclose(z.grad, w, rtol=1e-4, atol=1e-4)
    # under DDP the data term is the mean over ranks: simulate a second rank whose dS/dz is zero
    hook.loss(module, x, y)
    half = SimpleNamespace(all_reduce_mean=lambda t: t / 2)
    grads = hook.svgd_gradients(half)
    hook.loss(module, x, y)
    full = hook.svgd_gradients(module)
    with torch.enable_grad():
        zd = [z.detach().requires_grad_(True) for z in zs]
        gp = torch.autograd.grad(hook.dllp.log_prior(zd).sum(), zd)
    for g, f, p in zip(grads, full, gp):
        assert torch.allclose(g - p, (f - p) / 2, rtol=1e-5, atol=1e-5)
    assert svgd_direction_blocks([z.detach() for z in zs], grads)[0].shape == zs[0].shape


def test_eval_logits_is_log_of_mean_particle_probabilities():
    hook, _ = _hook(4)
    x = torch.randn(7, 6)
    out = hook.eval_logits(hook.model, x)
    probs = hook.model.forward_gates(x, hook.model.particle_gates("hard")).softmax(-1).mean(0)
    assert torch.allclose(out.exp(), probs, atol=1e-6)
    assert torch.allclose(out.exp().sum(-1), torch.ones(7), atol=1e-6)


@pytest.mark.parametrize("overrides, message", [
    (["method.gate=x"], "method.gate='x'; allowed values: soft, hard"),
    (["method.granularity=filter"], "method.granularity='filter'; allowed values: unit, weight"),
    (["method.decision=x"], "method.decision='x'; allowed values: threshold, target"),
    (["method.prior.importance=x"], "method.prior.importance='x'; allowed values: taylor, ablation, l2, bn"),
    (["method.prior.batches=0"], "method.prior.batches=0"),
    (["method.train_weights=maybe"], "method.train_weights='maybe'"),
    (["method.budget_lr=-1"], "method.budget_lr=-1"),
    (["method.granularity=weight", "method.prior.importance=ablation"], "method.prior.importance='ablation' needs"),
    (["method.tau.schedule=x"], "method.tau.schedule='x'; allowed values: geometric, linear"),
    (["+method.tau.foo=1"], "method.tau.foo is not an option"),
    (["method.particles=0"], "method.particles=0"),
    (["prune.sparsity=0.99"], "within method.prior.clip"),
    (["method.granularity=weight", "method.prior.importance=bn"], "method.prior.importance='bn' needs"),
    (["schedule=oneshot"], "allowed schedules: train_prune"),
])
def test_bad_options_fail_before_training(make_cfg, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        run_pipeline(make_cfg("method=dllp", "schedule=train_prune", *overrides))
    assert not list(tmp_path.rglob("dense"))
