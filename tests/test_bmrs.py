"""Tests for BMRS (prunelab.pruning.bayes.bmrs / lognormal): every closed form against numerical integration,
the pruning rules' properties, noise insertion on the registry's model families, and a small end-to-end run."""

from __future__ import annotations

import copy
import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from scipy import integrate
from scipy.stats import norm, truncnorm
from torch import nn

from prunelab.pruning.bayes import lognormal as ln
from prunelab.pruning.bayes.bmrs import (
    RULES,
    BMRSPruner,
    LogNormalNoise,
    delta_f_n,
    delta_f_u,
    find_noise,
    insert_noise,
    kl_loss,
    param_masks,
    prune_scores,
    rank_units,
    remove_noise,
    unit_param_counts,
)
from tests.helpers import check_pruned_beats_random, load_script, surplus_units_problem

LA, LB = -20.0, 0.0
LOG_A_PRIME = -23 * math.log(2.0)


# ---------------------------------------------------------------------------------------------- helpers


def log_tn_pdf(x, mu: float, sigma: float, lo: float = LA, hi: float = LB):
    """Log density of N(mu, sigma^2) truncated to [lo, hi] (vectorised); the normaliser comes from scipy's
    truncnorm, independently of the library's log-space CDF differences."""
    return norm.logpdf((np.asarray(x) - mu) / sigma) - math.log(sigma) - _log_z(mu, sigma, lo, hi)


@functools.cache
def _log_z(mu: float, sigma: float, lo: float, hi: float) -> float:
    x0 = min(max(mu, lo), hi)
    return float(
        norm.logpdf((x0 - mu) / sigma)
        - math.log(sigma)
        - truncnorm.logpdf(x0, (lo - mu) / sigma, (hi - mu) / sigma, loc=mu, scale=sigma)
    )


def log_quad(logf, lo: float, hi: float, points=()) -> float:
    """log of int_lo^hi exp(logf(x)) dx, with the integrand rescaled by its maximum on a fine grid."""
    grid = np.concatenate([np.linspace(lo, hi, 4001), [p for p in points if lo <= p <= hi]])
    m = float(np.max(logf(grid)))
    pts = sorted({min(max(p, lo), hi) for p in points} - {lo, hi})
    val, _ = integrate.quad(
        lambda x: math.exp(float(logf(x)) - m), lo, hi, points=pts or None, limit=500, epsabs=0, epsrel=1e-11
    )
    return m + math.log(val)


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny tensors: intra-op threading only adds overhead on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def t64(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64)


# ------------------------------------------------------------------------------------------ BMRS_N


@pytest.mark.parametrize("var_p", [0.5, 1e-2])
@pytest.mark.parametrize("mu_p", [LA, -12.0])
@pytest.mark.parametrize("mu,sigma", [(-20.0, 0.5), (-15.0, 2.0), (-10.0, 6.0), (-3.0, 1.0), (-25.0, 3.0)])
def test_delta_f_n_matches_quadrature(mu, sigma, mu_p, var_p):
    """Delta F = log int q(x) p~(x) / p(x) dx over x = log theta, with p uniform on [log a, log b]."""
    sd_p = math.sqrt(var_p)

    def logf(x):
        return log_tn_pdf(x, mu, sigma) + log_tn_pdf(x, mu_p, sd_p) + math.log(LB - LA)

    expected = log_quad(logf, LA, LB, points=(mu, mu_p))
    got = float(delta_f_n(t64(mu), t64(sigma), LA, LB, var_p=var_p, mu_p=mu_p))
    assert got == pytest.approx(expected, abs=1e-6, rel=1e-7)


def test_delta_f_n_spike_limit_is_density_at_lower_bound():
    """As var_p -> 0 (p~ a half spike at log a), exp(Delta F_N) -> (log b - log a) * q(log theta = log a)."""
    mus = torch.linspace(-30, 5, 36, dtype=torch.float64)
    for sigma in (0.3, 1.0, 4.0, 20.0):
        s = torch.full_like(mus, sigma)
        df = delta_f_n(mus, s, LA, LB, var_p=1e-12)
        limit = torch.tensor(
            [math.log(LB - LA) + log_tn_pdf(LA, float(m), sigma) for m in mus], dtype=torch.float64
        )
        torch.testing.assert_close(df, limit, atol=1e-4, rtol=1e-6)
        density = torch.exp(limit - math.log(LB - LA))
        prune = df >= 0
        margin = (density * (LB - LA) - 1).abs() > 1e-4
        assert torch.equal(prune[margin], (density >= 1 / (LB - LA))[margin])


def test_delta_f_n_code_variant_differs_by_half_log_2pi():
    mu = torch.linspace(-25, 3, 15, dtype=torch.float64)
    sigma = torch.logspace(-2, 1.5, 15, dtype=torch.float64)
    diff = delta_f_n(mu, sigma, variant="code") - delta_f_n(mu, sigma)
    torch.testing.assert_close(diff, torch.full_like(diff, 0.5 * math.log(2 * math.pi)), atol=1e-12, rtol=0)


def test_collapsing_unit_is_pruned_by_the_code_variant_only():
    """The finding behind the default: the KL drives a unit the data do not need towards the prior itself
    (the truncated log-normal flattens out, sigma growing; measured mu ~ -0.8, sigma ~ 25). On that path the
    exact Delta F_N (Eq. 8) rises to 0 from below and never reaches it (at the prior it is a tie), so the
    paper's formula prunes nothing; the code's formula (+1/2 log 2 pi) crosses 0 and prunes the unit."""
    sigmas = torch.logspace(0.5, 4, 30, dtype=torch.float64)
    for mu in (-10.0, -0.8):
        mus = torch.full_like(sigmas, mu)
        paper, code = delta_f_n(mus, sigmas, variant="paper"), delta_f_n(mus, sigmas, variant="code")
        assert (paper < 0).all() and paper[-1] > -1e-3 and (paper.diff() > 0).all()
        assert (code[-5:] > 0).all() and code[-1] == pytest.approx(0.5 * math.log(2 * math.pi), abs=1e-3)
    with pytest.raises(ValueError, match="variant"):
        delta_f_n(mus, sigmas, variant="code_compat")


def test_delta_f_n_non_increasing_in_mu():
    mus = torch.linspace(-35, 10, 901, dtype=torch.float64)
    for sigma in (0.05, 0.3, 1.0, 5.0, 40.0):
        df = delta_f_n(mus, torch.full_like(mus, sigma))
        assert torch.isfinite(df).all()
        assert (df.diff() <= 1e-9).all(), sigma
        assert df[0] > 0 > df[-1]  # at mu << log a: pruned; at mu >> log b: kept


# ------------------------------------------------------------------------------------------ BMRS_U


@pytest.mark.parametrize("p", [8, 4])
@pytest.mark.parametrize("mu,sigma", [(-10.0, 3.0), (-14.0, 0.5), (-4.0, 2.0), (-30.0, 10.0), (2.0, 5.0)])
def test_delta_f_u_matches_quadrature(mu, sigma, p):
    lbp = -p * math.log(2.0)

    def logf(x):  # q(x) * p~(x) / p(x), p~ uniform on [log a', log b']
        return log_tn_pdf(x, mu, sigma) + math.log(LB - LA) - math.log(lbp - LOG_A_PRIME)

    expected = log_quad(logf, LOG_A_PRIME, lbp, points=(mu,))
    got = float(delta_f_u(t64(mu), t64(sigma), LA, LB, p=p))
    assert got == pytest.approx(expected, abs=1e-7, rel=1e-7)


def test_delta_f_u_mass_threshold():
    """Prune iff q(a' <= theta <= b') >= log(b'/a') / log(b/a) (masses from plain CDF differences)."""
    g = torch.Generator().manual_seed(0)
    mu = torch.rand(400, generator=g, dtype=torch.float64) * 24 - 21
    sigma = torch.exp(torch.rand(400, generator=g, dtype=torch.float64) * 4.5 - 1.5)
    for p in (8, 4):
        lbp = -p * math.log(2.0)
        alpha, beta = (LA - mu) / sigma, (LB - mu) / sigma
        z = torch.special.ndtr(beta) - torch.special.ndtr(alpha)
        mass = (torch.special.ndtr((lbp - mu) / sigma) - torch.special.ndtr((LOG_A_PRIME - mu) / sigma)) / z
        ratio = (lbp - LOG_A_PRIME) / (LB - LA)
        df = delta_f_u(mu, sigma, p=p)
        ok = (mass - ratio).abs() > 1e-9
        assert ok.float().mean() > 0.95 and 0 < int((df >= 0).sum()) < 400
        assert torch.equal((df >= 0)[ok], (mass >= ratio)[ok])


# -------------------------------------------------------------------------- rule-level properties


def test_nothing_pruned_at_initialisation():
    noise = LogNormalNoise(10)  # mu = 0, log sigma = -5
    for rule in RULES:
        assert (prune_scores(noise, rule) < 0).all(), rule


def test_posterior_equal_to_prior_is_a_tie_and_slightly_lower_is_pruned():
    """q = prior gives Delta F = 0 exactly (pruned by the >= rule): a near-uniform posterior gives ~0 for both
    rules, and one that puts at least the prior's density at small theta is pruned by both."""
    mu, wide = t64(-10.0), t64(1e4)
    assert abs(float(delta_f_n(mu, wide))) < 1e-6
    assert abs(float(delta_f_u(mu, wide))) < 1e-6
    assert abs(float(delta_f_n(mu, t64(math.exp(5))))) < 5e-3  # sigma at the clamp of the noise layer
    for m in (-15.0, -19.0):
        assert float(delta_f_n(t64(m), t64(50.0))) > 0
        assert float(delta_f_u(t64(m), t64(50.0))) > 0
    noise = LogNormalNoise(3)
    with torch.no_grad():
        noise.mu.fill_(-15.0)
        noise.log_sigma.fill_(math.log(50.0))
    for rule in ("bmrs_n", "bmrs_u"):
        assert (prune_scores(noise, rule) >= 0).all()


# ------------------------------------------------------------------ log-normal moments, KL, sampling

MOMENT_CASES = [(0.0, math.exp(-5)), (-10.0, 3.0), (-18.0, 1.0), (5.0, 0.5), (-3.0, 0.05), (-10.0, 148.0)]


@pytest.mark.parametrize("mu,sigma", MOMENT_CASES)
def test_moments_and_kl_match_quadrature(mu, sigma):
    pts = (mu,)
    e = math.exp(log_quad(lambda x: x + log_tn_pdf(x, mu, sigma), LA, LB, pts))
    e2 = math.exp(log_quad(lambda x: 2 * x + log_tn_pdf(x, mu, sigma), LA, LB, pts))
    grid_kl, _ = integrate.quad(
        lambda x: math.exp(log_tn_pdf(x, mu, sigma)) * (log_tn_pdf(x, mu, sigma) + math.log(LB - LA)),
        max(LA, mu - 40 * sigma),
        min(LB, mu + 40 * sigma),
        points=[min(max(mu, LA), LB)] if LA < mu < LB else None,
        limit=500,
        epsabs=1e-12,
        epsrel=1e-10,
    )
    m, s = t64(mu), t64(sigma)
    assert float(ln.expected_theta(m, s, LA, LB)) == pytest.approx(e, rel=1e-8)
    assert float(ln.std_theta(m, s, LA, LB)) == pytest.approx(math.sqrt(e2 - e * e), rel=1e-5)
    assert float(ln.snr(m, s, LA, LB)) == pytest.approx(e / math.sqrt(e2 - e * e), rel=1e-5)
    assert float(ln.kl_to_log_uniform(m, s, LA, LB)) == pytest.approx(grid_kl, rel=1e-6, abs=1e-8)


def test_kl_is_zero_only_at_the_prior_and_positive_elsewhere():
    mu = torch.tensor([-10.0, 0.0, -19.0, -5.0], dtype=torch.float64)
    sigma = torch.tensor([1e4, 0.01, 0.5, 3.0], dtype=torch.float64)
    kl = ln.kl_to_log_uniform(mu, sigma, LA, LB)
    assert abs(float(kl[0])) < 1e-6 and (kl[1:] > 0.1).all()


@pytest.mark.parametrize(
    "mu,log_sigma",
    [(0.0, -5.0), (-10.0, 1.0), (-19.5, 0.0), (-40.0, -1.0), (30.0, -2.0), (8.0, -20.0), (-60.0, 5.0)],
)
def test_samples_within_bounds_and_mean_matches(mu, log_sigma):
    torch.manual_seed(0)
    noise = LogNormalNoise(4)
    with torch.no_grad():
        noise.mu.fill_(mu)
        noise.log_sigma.fill_(log_sigma)
    noise.train()
    x = torch.ones(20000, 4)
    theta = noise(x)
    assert torch.isfinite(theta).all()
    assert (theta >= math.exp(LA) * (1 - 1e-6)).all() and (theta <= math.exp(LB) * (1 + 1e-6)).all()
    e, sd = noise.expected_theta().float(), noise.std_theta().float()
    tol = 6 * sd / math.sqrt(theta.shape[0]) + 1e-5 * e
    assert ((theta.mean(0) - e).abs() <= tol).all()


def test_reparameterised_gradient_matches_closed_form_gradient():
    """d/dmu and d/dlog_sigma of the sample mean estimate those of E[theta] (pathwise gradient is unbiased)."""
    torch.manual_seed(0)
    noise = LogNormalNoise(3, sample_mode="element")
    with torch.no_grad():
        noise.mu.copy_(torch.tensor([-1.0, -3.0, -0.2]))
        noise.log_sigma.copy_(torch.tensor([0.0, -1.0, -0.5]))
    noise.train()
    noise(torch.ones(100000, 3)).mean(0).sum().backward()
    g_mc = (noise.mu.grad.clone(), noise.log_sigma.grad.clone())
    noise.zero_grad()
    noise.expected_theta().sum().backward()
    torch.testing.assert_close(g_mc[0], noise.mu.grad, rtol=0.03, atol=2e-3)
    torch.testing.assert_close(g_mc[1], noise.log_sigma.grad, rtol=0.05, atol=2e-3)


# (mu, log_sigma): central, lower-tail prior mass, initialisation (sigma = e^-5), mu below log a (both bounds
# far in the upper tail), mu above log b (both far in the lower tail), nearly flat
SAMPLER_CASES = [(-1.0, 0.0), (-3.0, -1.0), (-19.5, 0.0), (0.0, -5.0), (-40.0, -1.0), (5.0, -2.0), (-10.0, 3.0)]


def composed_sample(mu, sigma, u):
    """The sampler written as a composition of differentiable operations (autograd gives its gradient)."""
    return load_script("bench_bmrs_step").composed_sample_log_theta(mu, sigma, LA, LB, u)


def _sampler_inputs(mu: float, log_sigma: float, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    m = torch.tensor([mu, mu + 0.5, mu - 0.5], dtype=dtype).view(1, 3, 1, 1).requires_grad_()
    s = (torch.tensor([log_sigma, log_sigma - 0.3, log_sigma + 0.3], dtype=dtype).exp().view(1, 3, 1, 1)
         .detach().requires_grad_())
    u = torch.rand(4, 3, 2, 2, generator=g, dtype=dtype).clamp(1e-6, 1 - 1e-6)
    return m, s, u


@pytest.mark.parametrize("mu,log_sigma", SAMPLER_CASES)
def test_sampler_pathwise_gradient_matches_finite_differences(mu, log_sigma):
    """The closed-form gradient of ``sample_log_theta`` (per-unit mu, sigma broadcast over the draws) against
    central finite differences in float64."""
    m, s, u = _sampler_inputs(mu, log_sigma)
    assert torch.autograd.gradcheck(lambda a, b: ln.sample_log_theta(a, b, LA, LB, u), (m, s), eps=1e-7,
                                    atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mu,log_sigma", SAMPLER_CASES)
def test_sampler_equals_autograd_through_the_composed_formula(mu, log_sigma):
    """float64: the same samples and, to rounding, the same gradient as autograd through the composed
    operations. float32 (where LogNormalNoise samples in float32): the same samples to rounding, and a gradient
    no further from the float64 one (same draws) than the composed formula's float32 gradient is."""
    m, s, u = _sampler_inputs(mu, log_sigma)
    w = torch.randn(u.shape, generator=torch.Generator().manual_seed(1), dtype=u.dtype)

    def grads(fn, m, s, u, w):
        x = fn(m, s, u)
        return x, torch.autograd.grad((x * w).sum(), (m, s))

    x, g = grads(lambda a, b, c: ln.sample_log_theta(a, b, LA, LB, c), m, s, u, w)
    x_ref, g_ref = grads(composed_sample, m, s, u, w)
    torch.testing.assert_close(x, x_ref, rtol=0, atol=0)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)

    noise = LogNormalNoise(3)
    if noise._needs_float64(m.detach().float().flatten(), s.detach().float().flatten()):
        return  # LogNormalNoise samples in float64 here
    m32, s32 = (t.detach().float().requires_grad_() for t in (m, s))
    u32 = u.float()
    _, g_true = grads(lambda a, b, c: ln.sample_log_theta(a, b, LA, LB, c), m32.double().detach().requires_grad_(),
                      s32.double().detach().requires_grad_(), u32.double(), w)
    x32, g32 = grads(lambda a, b, c: ln.sample_log_theta(a, b, LA, LB, c), m32, s32, u32, w.float())
    x32_ref, g32_ref = grads(composed_sample, m32, s32, u32, w.float())
    torch.testing.assert_close(x32, x32_ref)
    scale = max(float(t.abs().max()) for t in g_true)
    for new, old, true in zip(g32, g32_ref, g_true):
        err_new, err_old = float((new.double() - true).abs().max()), float((old.double() - true).abs().max())
        assert err_new <= 1.5 * err_old + 1e-5 * scale, (err_new, err_old)


def test_bench_bmrs_step_runs(capsys):
    load_script("bench_bmrs_step").main(["--batch", "8", "--steps", "2", "--pairs", "2"])
    out = capsys.readouterr().out
    assert "closed_form" in out and "composed" in out and "speed-up (composed / closed form)" in out


def test_noise_layer_modes_and_mask():
    torch.manual_seed(0)
    noise = LogNormalNoise(3, dim=1)
    with torch.no_grad():
        noise.mu.copy_(torch.tensor([-0.5, -2.0, -1.0]))
        noise.log_sigma.fill_(0.0)
    x = torch.rand(5, 3, 4, 4) + 0.5
    noise.eval()
    torch.testing.assert_close(noise(x), x * noise.expected_theta().float().view(1, 3, 1, 1))
    noise.mask[1] = False
    assert (noise(x)[:, 1] == 0).all()
    noise.train()
    out = noise(x)
    assert (out[:, 1] == 0).all() and (out[:, [0, 2]] != 0).all()
    ratio = out / x
    assert ratio[:, 0].unique().numel() > 1  # element mode: independent per position
    noise.sample_mode = "batch"
    r = noise(x) / x
    torch.testing.assert_close(r, r[:1, :, :1, :1].expand_as(r))
    noise.sample_mode = "sample"
    r = noise(x) / x
    torch.testing.assert_close(r, r[:, :, :1, :1].expand_as(r))
    assert not torch.allclose(r[0], r[1])


def test_kl_loss_scalings():
    torch.manual_seed(0)
    noises = {"a": LogNormalNoise(3), "b": LogNormalNoise(5)}
    with torch.no_grad():
        for n in noises.values():
            n.mu.uniform_(-15, 0)
            n.log_sigma.uniform_(-3, 2)
    ka, kb = noises["a"].kl(), noises["b"].kl()
    assert float(kl_loss(noises)) == pytest.approx(float((ka.mean() + kb.mean()) / 2), rel=1e-6)
    assert float(kl_loss(noises, "elbo", n_train=100)) == pytest.approx(
        float((ka.sum() + kb.sum()) / 100), rel=1e-6
    )
    with pytest.raises(ValueError):
        kl_loss(noises, "elbo")
    kl_loss(noises).backward()
    assert all(
        p.grad is not None and torch.isfinite(p.grad).all() for n in noises.values() for p in n.parameters()
    )


# ------------------------------------------------------------------------------ insertion into models


def small_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))


class TinyLeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 5), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, 20), nn.ReLU(), nn.Linear(20, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


def test_insert_noise_mlp_and_lenet_placement():
    mlp = small_mlp()
    keys = set(mlp.state_dict())
    noises = insert_noise(mlp)
    assert {k: (v.units, v.dim) for k, v in noises.items()} == {
        "1.bmrs_noise": (32, -1),
        "3.bmrs_noise": (16, -1),
    }
    assert keys <= set(mlp.state_dict())  # existing parameter names unchanged
    lenet = TinyLeNet()
    noises = insert_noise(lenet)
    assert {k: (v.units, v.dim) for k, v in noises.items()} == {
        "features.1.bmrs_noise": (6, 1),
        "features.4.bmrs_noise": (8, 1),
        "classifier.2.bmrs_noise": (20, -1),
    }
    lenet.eval()
    x = torch.randn(2, 1, 28, 28)
    ref = lenet(x)
    noises["classifier.2.bmrs_noise"].mask[:] = False  # all hidden fc units pruned -> output = fc bias
    torch.testing.assert_close(lenet(x), lenet.classifier[3].bias.expand(2, 10))
    assert not torch.allclose(ref, lenet(x))
    with pytest.raises(ValueError):
        insert_noise(lenet)


@pytest.mark.parametrize("arch,n_bn", [("resnet18", 20), ("resnet50", 53)])
def test_insert_noise_torchvision_resnets(arch, n_bn):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10)
    keys = set(model.state_dict())
    noises = insert_noise(model)
    assert len(noises) == n_bn and all(n.dim == 1 for n in noises.values())
    assert noises["layer1.0.bn1.bmrs_noise"].units == model.layer1[0].bn1.num_features
    assert keys <= set(model.state_dict())
    assert not any("fc" in k for k in noises)
    model.train()
    model(torch.randn(2, 3, 32, 32))  # sampled noise broadcasts
    clone = copy.deepcopy(model).eval()
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(clone(x), model(x))
    find_noise(clone)["layer1.0.bn1.bmrs_noise"].mask[:] = False  # the copy's hook uses the copy's noise
    assert not torch.allclose(clone(x), model(x))
    remove_noise(clone)
    assert not find_noise(clone) and set(clone.state_dict()) == keys


def test_unit_param_counts():
    mlp = small_mlp()
    c = unit_param_counts(mlp, insert_noise(mlp))
    assert (
        c["1.bmrs_noise"].tolist() == [10 + 1 + 2 + 16] * 32
    )  # in-row + bias + (mu, log_sigma) + out-column
    assert c["3.bmrs_noise"].tolist() == [32 + 1 + 2 + 3] * 16
    lenet = TinyLeNet()
    c = unit_param_counts(lenet, insert_noise(lenet), torch.zeros(2, 1, 28, 28))
    assert int(c["features.1.bmrs_noise"][0]) == 25 + 1 + 2 + 8 * 25
    assert int(c["features.4.bmrs_noise"][0]) == 6 * 25 + 1 + 2 + 20 * 16  # flatten: 4x4 columns per channel
    resnet = torchvision.models.resnet18(num_classes=10)
    c = unit_param_counts(resnet, insert_noise(resnet), torch.zeros(2, 3, 32, 32))
    assert int(c["layer1.0.bn1.bmrs_noise"][0]) == 64 * 9 + 2 + 2 + 64 * 9
    assert int(c["layer1.0.bn2.bmrs_noise"][0]) == 64 * 9 + 2 + 2  # feeds the residual sum: no consumer
    assert int(c["bn1.bmrs_noise"][0]) == 3 * 49 + 2 + 2  # the stem output forks (identity + conv)


@pytest.mark.parametrize("make", [small_mlp, TinyLeNet, lambda: torchvision.models.resnet18(num_classes=10)])
def test_param_masks_reproduce_unit_pruning(make):
    """Zeroing the parameters named by param_masks (noise kept) gives the same eval output as masking the units."""
    torch.manual_seed(0)
    model = make()
    noises = insert_noise(model)
    x = (
        torch.randn(3, 10)
        if isinstance(model, nn.Sequential)
        else torch.randn(3, 1 if isinstance(model, TinyLeNet) else 3, 28, 28)
    )
    with torch.no_grad():
        for n in noises.values():
            n.mu.uniform_(-2, 0)
            n.mask.copy_(torch.rand(n.units) > 0.4)
    model.eval()
    if hasattr(model, "layer1"):  # make BatchNorm non-trivial
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.bias.data.uniform_(-1, 1)
    with torch.no_grad():
        expected = model(x)
        masks = param_masks(model, noises, example=x[:2])
        params = dict(model.named_parameters())
        for name, m in masks.items():
            params[name].mul_(m)
        for n in noises.values():
            n.mask.fill_(True)
        got = model(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    removed = sum(int((~m).sum()) for m in masks.values())
    assert removed > 0


# -------------------------------------------------------------------------------------- controller


def test_pruner_continuous_masks_freeze_stats_and_ranking():
    mlp = small_mlp()
    noises = insert_noise(mlp)
    pr = BMRSPruner(noises, rule="bmrs_n", model=mlp)
    n1 = noises["1.bmrs_noise"]
    with torch.no_grad():
        n1.mu[:4] = -19.5
        n1.log_sigma[:4] = 0.0
    masks = pr.update_masks()
    assert masks["1.bmrs_noise"][:4].tolist() == [False] * 4 and masks["1.bmrs_noise"][4:].all()
    s = pr.stats()
    assert (s["units_pruned"], s["units_total"]) == (4, 48)
    assert s["frac_units_removed"] == pytest.approx(4 / 48)
    assert s["params_removed"] == 4 * (10 + 1 + 2 + 16)
    assert s["frac_params_removed"] == pytest.approx(4 * 29 / sum(p.numel() for p in mlp.parameters()))
    assert s["delta_f_n_variant"] == "code" and s["layers"]["1.bmrs_noise"]["pruned"] == 4
    ranked = rank_units(noises, "bmrs_n")
    assert {(n, i) for n, i, _ in ranked[:4]} == {("1.bmrs_noise", i) for i in range(4)}
    assert all(a[2] >= b[2] for a, b in zip(ranked, ranked[1:]))
    with torch.no_grad():
        n1.mu[:2] = 0.0  # units come back when their posterior moves away
        n1.log_sigma[:2] = -5.0
    assert pr.update_masks()["1.bmrs_noise"][:4].tolist() == [True, True, False, False]
    pr.freeze()
    with torch.no_grad():
        n1.mu[5] = -19.5
    assert pr.update_masks()["1.bmrs_noise"][5]
    assert BMRSPruner(noises).stats()["delta_f_n_variant"] == "code"  # the default: the authors' code
    assert BMRSPruner(noises, delta_f_n_variant="paper").stats()["delta_f_n_variant"] == "paper"
    with pytest.raises(ValueError):
        BMRSPruner(noises, rule="magnitude")
    with pytest.raises(ValueError, match="code"):
        BMRSPruner(noises, delta_f_n_variant="code_compat")


# ------------------------------------------------------------------------------- end to end (small)


def test_bmrs_on_small_mlp_prunes_surplus_units():
    """Variational training (CE + KL/N) of a 20-64-2 ReLU MLP on data with 2 informative dims; BMRS removes
    surplus hidden units at (almost) no cost, and far less harmfully than removing as many random units."""
    _train_and_check_small_mlp()


def _train_and_check_small_mlp() -> None:
    model, (xtr, ytr, xte, yte) = surplus_units_problem()
    noises = insert_noise(model)
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(500):
        idx = torch.randint(0, 1024, (128,))
        loss = F.cross_entropy(model(xtr[idx]), ytr[idx]) + kl_loss(noises, "elbo", n_train=1024)
        opt.zero_grad()
        loss.backward()
        opt.step()
    noise = noises["1.bmrs_noise"]
    for rule, kw in (("bmrs_u", {}), ("bmrs_n", {"delta_f_n_variant": "code"})):
        keep = BMRSPruner(noises, rule=rule, **kw).update_masks()["1.bmrs_noise"].clone()
        check_pruned_beats_random(model, noise, keep, xte, yte)
