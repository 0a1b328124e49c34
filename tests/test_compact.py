"""Physical removal of pruned channels: the compacted model computes the masked model's function, is smaller,
and its predicted cost (CostModel) is exact; save/load and ONNX export."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from prunelab.metrics.latency import count_flops, count_params, measure_latency
from prunelab.models import build_model
from prunelab.pipeline.context import compacted_sparsity
from prunelab.pruning.masks import MaskSet
from prunelab.pruning.units.compact import CostModel, compact, export_onnx, load_compact, save_compact
from prunelab.pruning.units.gates import Gates
from prunelab.pruning.units.groups import build_groups, param_masks
from prunelab.pruning.units.sites import SiteHook

CASES = {
    "mlp": ("mlp", (1, 28, 28), {}),
    "lenet_300_100": ("lenet_300_100", (1, 28, 28), {}),
    "lenet5": ("lenet5", (1, 28, 28), {}),
    "vgg19_narrow": ("vgg19", (3, 32, 32), {"width": 0.25}),
    "resnet18": ("resnet18", (3, 32, 32), {}),
    "resnet20": ("resnet20", (3, 32, 32), {}),
    "resnet50": ("resnet50", (3, 32, 32), {}),
    "timm_resnet10t": ("timm", (3, 32, 32), {"arch": "resnet10t"}),
}


def _randomize_norms(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BN statistics and affine parameters (a pruned channel's shift must not leak)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.2 * torch.randn(n, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
            m.weight.data.copy_(1 + 0.2 * torch.randn(n, generator=gen))
            m.bias.data.copy_(0.2 * torch.randn(n, generator=gen))


@pytest.fixture(scope="module", params=list(CASES))
def pruned(request):
    name, shape, kw = CASES[request.param]
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = build_model(name, shape, 10, **kw)
    with torch.no_grad():
        _randomize_norms(model, gen)
    x = torch.randn(3, *shape, generator=gen)
    groups = build_groups(model, x[:1])
    masks = {}
    for g in groups:
        keep = torch.rand(g.num_units, generator=gen) < 0.6
        keep[torch.randint(g.num_units, (1,), generator=gen)] = True
        masks[g.id] = keep
    gates = Gates(model, groups)
    gates.set_masks(masks)
    model.eval()
    small = compact(model, masks, x[:1], groups)
    small.eval()
    return {"name": request.param, "model": model, "small": small, "x": x, "groups": groups, "masks": masks,
            "shape": shape, "gates": gates}


def test_compacted_equals_masked(pruned):
    model, small, x = pruned["model"], pruned["small"], pruned["x"]
    with torch.no_grad():
        y_masked, y_small = model(x), small(x)
    assert y_small.shape == y_masked.shape
    torch.testing.assert_close(y_small, y_masked, atol=1e-5, rtol=1e-5)
    # and the mask matters: the unmasked model computes something else
    pruned["gates"].remove()
    try:
        with torch.no_grad():
            y_dense = model(x)
    finally:
        pruned["gates"].install()
    assert (y_dense - y_masked).abs().max() > 1e-3


def test_compacted_is_smaller_and_cost_model_exact(pruned):
    model, small, shape = pruned["model"], pruned["small"], pruned["shape"]
    pruned["gates"].remove()
    try:
        f0, p0 = count_flops(model, shape), count_params(model)
        cost = CostModel(model, pruned["groups"], shape)
    finally:
        pruned["gates"].install()
    f1, p1 = count_flops(small, shape), count_params(small)
    assert f1 < f0 and p1 < p0
    assert cost.estimate(pruned["masks"]) == (f1, p1)
    assert (cost.total_flops, cost.total_params) == (f0, p0)
    assert not any(isinstance(h, SiteHook) for m in small.modules() for h in m._forward_hooks.values())


def test_producer_widths_match_masks(pruned):
    """Every producer conv / linear / BN keeps exactly the number of kept units of its group."""
    small = pruned["small"]
    for g in pruned["groups"]:
        kept = int(pruned["masks"][g.id].sum())
        for mem in g.producers():
            layer = small.get_submodule(mem.name)
            width = layer.weight.shape[0]
            per_unit = len(mem.idxs) // g.num_units
            assert width == kept * per_unit, (g.id, mem.name)


def test_param_masks_zeroing_matches_compaction(pruned):
    """Zeroing the parameters flagged by param_masks (and keeping the gates) changes nothing: the masked
    convention is consistent with what compaction removes."""
    model, x = pruned["model"], pruned["x"]
    pm = param_masks(model, pruned["groups"], pruned["masks"])
    assert pm and all(m.dtype == torch.bool for m in pm.values())
    n_false = sum(int((~m).sum()) for m in pm.values())
    assert n_false > 0
    with torch.no_grad():
        y0 = model(x)
        saved = {n: p.detach().clone() for n, p in model.named_parameters()}
        params = dict(model.named_parameters())
        for n, m in pm.items():
            params[n].mul_(m)
        y1 = model(x)
        for n, p in model.named_parameters():
            p.copy_(saved[n])
    torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-5)


def _group_with(groups, name):
    return next(g for g in groups if any(m.name == name for m in g.producers()))


def test_residual_channels_pruned_together():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    model = build_model("resnet18", (3, 32, 32), 10)
    groups = build_groups(model, x)
    g = _group_with(groups, "layer2.0.downsample.1")
    producers = {m.name for m in g.producers()}
    assert {"layer2.0.downsample.0", "layer2.0.bn2", "layer2.1.bn2", "layer2.0.conv2", "layer2.1.conv2"} <= producers
    assert {m.name for m in g.consumers()} >= {"layer2.1.conv1", "layer3.0.conv1", "layer3.0.downsample.0"}
    stem = _group_with(groups, "bn1")
    assert {"layer1.0.bn2", "layer1.1.bn2"} <= {m.name for m in stem.producers()}
    # gates: one per BN output of the coupled set, none before a BN
    sites = {s.name for s in g.gates}
    assert sites == {"layer2.0.downsample.1", "layer2.0.bn2", "layer2.1.bn2"}
    keep = torch.ones(g.num_units, dtype=torch.bool)
    keep[::3] = False
    small = compact(model, {g.id: keep}, x, groups)
    widths = {small.get_submodule(n).weight.shape[0] for n in producers}
    assert widths == {int(keep.sum())}
    assert small.layer3[0].conv1.in_channels == int(keep.sum())
    assert small.layer2[0].conv1.out_channels == 128  # a different group: untouched
    assert model.layer2[0].bn2.num_features == 128  # the original is not modified


def test_save_load_and_onnx(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = build_model("resnet20", (3, 32, 32), 10)
    groups = build_groups(model, x[:1])
    masks = {g.id: torch.arange(g.num_units) % 2 == 0 for g in groups}
    gates = Gates(model, groups)
    gates.set_masks(masks)
    small = compact(model, masks, x[:1], groups).eval()
    path = tmp_path / "small.pt"
    save_compact(small, path)
    loaded = load_compact(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small(x))
    assert loaded.conv1.out_channels == 8 and count_params(loaded) == count_params(small)

    onnx = pytest.importorskip("onnx")
    opath = tmp_path / "small.onnx"
    export_onnx(small, opath, x[:1])
    proto = onnx.load(str(opath))
    onnx.checker.check_model(proto)
    shapes = {tuple(t.dims) for t in proto.graph.initializer}
    assert (8, 3, 3, 3) in shapes  # the stem conv has 8 of its 16 filters left
    try:
        import onnxruntime as ort
    except ImportError:
        return
    sess = ort.InferenceSession(str(opath))
    out = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), small(x), atol=1e-4, rtol=1e-4)


def test_flop_and_param_counts_known_layers():
    lin = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    assert count_flops(lin, (3, 2, 2)) == 2 * 12 * 5  # FlopCounterMode: 2 x MACs, bias ignored
    assert count_params(lin) == 12 * 5 + 5
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    assert count_flops(conv, (3, 8, 8)) == 2 * (4 * 8 * 8) * (3 * 3 * 3)
    assert count_flops(conv, (3, 8, 8), batch_size=2) == 2 * count_flops(conv, (3, 8, 8))


def test_measure_latency_reports_medians():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    model.train()
    out = measure_latency(model, (3, 2, 2), batch_sizes=(1, 4), warmup=1, repeats=3, threads=1)
    assert set(out) == {"latency_ms_b1", "latency_ms_b4"}
    assert all(v > 0 for v in out.values())
    assert model.training  # mode restored


# -- sparsity of a compacted model (what the prune stage of BMRS / DLLP records) ----------------------------
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))


def _compacted(keep: dict[str, torch.Tensor]):
    from prunelab.pruning.units.compact import compact_units
    from prunelab.pruning.units.sites import layer_sites, site_param_masks

    model, x = _mlp(), torch.randn(2, 6)
    sites = layer_sites(model, example=x)
    with torch.no_grad():  # the pruned units' parameters are zero, as compact_units requires
        MaskSet(site_param_masks(model, sites, keep, x)).apply(model)
    small, left, _ = compact_units(model, keep, sites, x)
    return model, small, left


def test_compacted_sparsity_without_kept_units_is_the_fraction_removed():
    model, small, left = _compacted({"0": torch.tensor([1, 0, 1, 0, 1]).bool(), "2": torch.ones(4, dtype=torch.bool)})
    assert left is None
    before, after = count_params(model), count_params(small)
    sp = compacted_sparsity(before, after, small, left, (6,))
    assert after == before - 2 * (6 + 1 + 4)  # two units: their rows, biases and the next layer's columns
    assert sp["params/remaining"] == after and sp["layer_collapse"] == 0.0
    assert sp["sparsity/direct"] == sp["sparsity/effective"] == pytest.approx(1 - after / before)


def test_compacted_sparsity_of_an_emptied_layer_is_a_collapse():
    """Every unit of the second hidden layer pruned: the compaction keeps one of them, zero and masked (a
    layer never loses all its units), so the network's output is a constant. That is a collapse (effective
    sparsity 1, compression inf), not the 1 - after/before that the kept zero unit would make look connected;
    the direct count includes the kept unit's masked entries."""
    model, small, left = _compacted({"0": torch.ones(5, dtype=torch.bool), "2": torch.zeros(4, dtype=torch.bool)})
    assert left is not None and small[2].out_features == 1
    before, after = count_params(model), count_params(small)
    masked = left.numel() - left.remaining()
    assert masked == 5 + 1 + 3  # the kept unit's row, bias and column in the classifier
    sp = compacted_sparsity(before, after, small, left, (6,))
    assert sp["layer_collapse"] == 1.0
    assert sp["params/remaining"] == after - masked
    assert sp["sparsity/direct"] == pytest.approx(1 - (after - masked) / before)
    assert sp["sparsity/effective"] == 1.0 and sp["compression/effective"] == math.inf
    with torch.no_grad():  # and the network is indeed constant
        out = small(torch.randn(8, 6))
    assert torch.allclose(out, out[:1].expand_as(out))


def test_compacted_sparsity_counts_weights_cut_off_by_kept_units():
    """A kept, masked unit whose incoming weights are masked but whose outgoing column is not: that column
    is on no input -> output path, so it is counted in the effective sparsity and not in the direct one."""
    model = _mlp()
    w, b = torch.ones(5, 6, dtype=torch.bool), torch.ones(5, dtype=torch.bool)
    w[1], b[1] = False, False
    masks = MaskSet({"0.weight": w, "0.bias": b})
    before = count_params(model)
    sp = compacted_sparsity(before + 10, before, model, masks, (6,))  # as if 10 parameters had been removed
    assert sp["layer_collapse"] == 0.0
    assert sp["params/remaining"] == before - 7
    assert sp["sparsity/direct"] == pytest.approx(1 - (before - 7) / (before + 10))
    assert sp["sparsity/effective"] == pytest.approx(1 - (before - 7 - 4) / (before + 10))  # unit 1's column


def test_compacted_sparsity_of_a_model_with_attention_is_the_direct_one():
    """Attention is not path-linear (prunelab.pruning.effective): the effective sparsity of a compacted
    transformer falls back to the direct one rather than to a path count that softmax would distort."""
    from prunelab.pruning.effective import path_linear

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)
            self.attn = nn.MultiheadAttention(6, 2, batch_first=True)

        def forward(self, x):
            return self.attn(self.fc(x), x, x)[0]

    model = Block()
    assert not path_linear(model) and path_linear(_mlp())
    w, b = torch.ones(6, 6, dtype=torch.bool), torch.ones(6, dtype=torch.bool)
    w[0], b[0] = False, False
    before = count_params(model)
    sp = compacted_sparsity(before, before, model, MaskSet({"fc.weight": w, "fc.bias": b}), (4, 6))
    assert sp["params/remaining"] == before - 7 and sp["layer_collapse"] == 0.0
    assert sp["sparsity/effective"] == sp["sparsity/direct"] == pytest.approx(7 / before)
