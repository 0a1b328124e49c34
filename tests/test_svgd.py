"""Property tests of the generic SVGD math (prunelab.pruning.bayes.svgd; Liu & Wang 2016, eq. 8)."""

from __future__ import annotations

import math

import pytest
import torch

from prunelab.pruning.bayes.svgd import median_bandwidth, rbf_kernel, svgd_direction, svgd_direction_blocks


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is much faster on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gauss_grad(z: torch.Tensor, mu: float, sd: float) -> torch.Tensor:
    return -(z - mu) / sd**2


def test_single_particle_is_gradient_ascent() -> None:
    torch.manual_seed(0)
    z = torch.randn(1, 7, dtype=torch.float64)
    g = torch.randn(1, 7, dtype=torch.float64)
    kmat, grad_k = rbf_kernel(z)
    assert torch.equal(kmat, torch.ones(1, 1, dtype=torch.float64))
    assert torch.equal(grad_k, torch.zeros_like(z))
    assert torch.equal(svgd_direction(z, g), g)


def test_median_bandwidth_formula() -> None:
    z = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    # squared distances of the pairs: 1, 9, 4 -> median 4; h2 = 4 / log(4)
    assert median_bandwidth(z).item() == pytest.approx(4.0 / math.log(4.0))
    kmat, _ = rbf_kernel(z)
    h2 = 4.0 / math.log(4.0)
    assert kmat[0, 2].item() == pytest.approx(math.exp(-9.0 / h2))
    assert torch.allclose(kmat, kmat.t())


def test_kernel_gradient_matches_autograd() -> None:
    torch.manual_seed(1)
    z = torch.randn(6, 4, dtype=torch.float64)
    h2 = median_bandwidth(z)
    _, grad_k = rbf_kernel(z, h2)
    for i in range(z.shape[0]):
        zj = z.clone().requires_grad_(True)
        k_i = torch.exp(-((zj - z[i]) ** 2).sum(1) / h2)  # k(z_j, z_i) for all j, z_i held fixed
        (g,) = torch.autograd.grad(k_i.sum(), zj)
        assert torch.allclose(grad_k[i], g.sum(0), atol=1e-12), i


def test_kernel_gradient_large_dim_path_matches_direct() -> None:
    """The Gram-matrix distance path (large M^2 D) gives the same kernel as the direct one."""
    torch.manual_seed(2)
    z = torch.randn(12, 40000, dtype=torch.float64) * 0.01
    k_big, g_big = rbf_kernel(z)
    d2 = (z.unsqueeze(1) - z.unsqueeze(0)).pow(2).sum(-1)
    h2 = median_bandwidth(z)
    assert torch.allclose(k_big, torch.exp(-d2 / h2), atol=1e-9)
    ref = (2.0 / h2) * (z * k_big.sum(0, keepdim=True).t() - k_big @ z)
    assert torch.allclose(g_big, ref, atol=1e-9)


def test_permutation_equivariance() -> None:
    torch.manual_seed(3)
    z = torch.randn(9, 5, dtype=torch.float64)
    g = torch.randn(9, 5, dtype=torch.float64)
    perm = torch.randperm(9)
    phi = svgd_direction(z, g)
    assert torch.allclose(svgd_direction(z[perm], g[perm]), phi[perm], atol=1e-12)


def test_repulsion_points_away_and_flat_target_spreads() -> None:
    torch.manual_seed(4)
    z = 0.1 * torch.randn(20, 3, dtype=torch.float64)
    phi = svgd_direction(z, torch.zeros_like(z))
    # the repulsive field points away from the particles' centre
    assert ((z - z.mean(0)) * phi).sum().item() > 0

    def mean_pdist(t: torch.Tensor) -> float:
        return torch.pdist(t).mean().item()

    d0 = mean_pdist(z)
    for _ in range(50):
        z = z + 0.05 * svgd_direction(z, torch.zeros_like(z))
    assert mean_pdist(z) > 1.5 * d0


def test_recovers_1d_gaussian() -> None:
    torch.manual_seed(5)
    mu, sd = 2.0, 0.5
    z = torch.randn(200, 1, dtype=torch.float64)  # N(0, 1) start: wrong mean and variance
    for _ in range(500):
        z = z + 0.2 * svgd_direction(z, _gauss_grad(z, mu, sd))
    assert z.mean().item() == pytest.approx(mu, rel=0.05)
    assert z.std().item() == pytest.approx(sd, rel=0.10)


def test_recovers_1d_gaussian_with_adam() -> None:
    torch.manual_seed(6)
    mu, sd = 2.0, 0.5
    z = torch.nn.Parameter(torch.randn(200, 1, dtype=torch.float64))
    opt = torch.optim.Adam([z], lr=0.05)
    for step in range(800):
        if step == 500:
            opt.param_groups[0]["lr"] = 0.005
        z.grad = -svgd_direction(z.detach(), _gauss_grad(z.detach(), mu, sd))
        opt.step()
    assert z.mean().item() == pytest.approx(mu, rel=0.05)
    assert z.std().item() == pytest.approx(sd, rel=0.10)


def test_blocks_are_independent() -> None:
    torch.manual_seed(7)
    a, b = torch.randn(5, 3, dtype=torch.float64), 100 * torch.randn(5, 8, dtype=torch.float64)
    ga, gb = torch.randn_like(a), torch.randn_like(b)
    pa, pb = svgd_direction_blocks([a, b], [ga, gb])
    assert torch.equal(pa, svgd_direction(a, ga))
    assert torch.equal(pb, svgd_direction(b, gb))
    # one joint kernel over [a, b] would differ: the wide block dominates the bandwidth
    joint = svgd_direction(torch.cat([a, b], 1), torch.cat([ga, gb], 1))
    assert not torch.allclose(joint[:, :3], pa)
    with pytest.raises(ValueError):
        svgd_direction_blocks([a], [ga, gb])
