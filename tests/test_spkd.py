"""Similarity-preserving KD (Tung & Mori, ICCV 2019) and its use with expanded students (Qian et al. 2022)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torchvision
from torch import nn

from prunelab.finetune.overparam import ExpandedConv2d, expand_model
from prunelab.finetune.spkd import FeatureRecorder, SPKDLoss, default_positions, similarity_matrix, sp_loss


def _loop_sp_loss(fs: torch.Tensor, ft: torch.Tensor) -> float:
    """Eq. 1-3 of Tung & Mori written out element by element."""
    b = fs.shape[0]
    qs = [fs[i].flatten().tolist() for i in range(b)]
    qt = [ft[i].flatten().tolist() for i in range(b)]

    def gram(q: list[list[float]]) -> list[list[float]]:
        g = [[sum(u * v for u, v in zip(q[i], q[j])) for j in range(b)] for i in range(b)]
        norms = [math.sqrt(sum(v * v for v in row)) for row in g]
        return [[g[i][j] / norms[i] for j in range(b)] for i in range(b)]

    gs, gt = gram(qs), gram(qt)
    return sum((gs[i][j] - gt[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2


def test_sp_loss_matches_explicit_formula() -> None:
    torch.manual_seed(0)
    fs = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    ft = torch.randn(5, 8, 2, 2, dtype=torch.float64) + 0.5  # other channels and size: only b must match
    loss = sp_loss(fs, ft)
    assert loss.shape == ()
    assert abs(loss.item() - _loop_sp_loss(fs, ft)) < 1e-12
    assert loss.item() > 1e-3


def test_similarity_matrix_is_row_normalised_gram() -> None:
    """Eq. 2 normalises the ROWS of Q Q^T (the loss alone cannot tell rows from columns: G~ is symmetric)."""
    torch.manual_seed(7)
    f = torch.randn(4, 2, 3, dtype=torch.float64)
    f[0] *= 10.0
    g = similarity_matrix(f)
    q = f.reshape(4, -1)
    gram = q @ q.t()
    assert torch.allclose(g.norm(dim=1), torch.ones(4, dtype=torch.float64))
    assert torch.allclose(g, gram / gram.norm(dim=1, keepdim=True))
    assert not torch.allclose(g, g.t())


def test_sp_loss_zero_for_identical_and_invariances() -> None:
    torch.manual_seed(1)
    fs = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    ft = torch.randn(6, 7, 3, 3, dtype=torch.float64)
    assert sp_loss(fs, fs.clone()).item() < 1e-24
    base = sp_loss(fs, ft).item()
    perm = torch.randperm(4)
    assert abs(sp_loss(fs[:, perm], ft).item() - base) < 1e-12  # channel permutation of the student
    assert abs(sp_loss(3.7 * fs, ft).item() - base) < 1e-12  # row normalisation: scale free
    with pytest.raises(ValueError):
        sp_loss(fs, ft[:5])


def test_sp_loss_gradients_student_only() -> None:
    torch.manual_seed(2)
    fs = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    ft = torch.randn(4, 5, 2, 2, dtype=torch.float64, requires_grad=True)
    sp_loss(fs, ft).backward()
    assert ft.grad is None
    assert fs.grad is not None and fs.grad.abs().sum() > 0
    ft2 = ft.detach()
    assert torch.autograd.gradcheck(lambda s: sp_loss(s, ft2), (fs.detach().clone().requires_grad_(),))


def test_sp_loss_half_precision_promoted() -> None:
    torch.manual_seed(3)
    fs, ft = torch.randn(4, 6), torch.randn(4, 9)
    loss = sp_loss(fs.bfloat16(), ft.bfloat16())
    assert loss.dtype == torch.float32
    assert abs(loss.item() - sp_loss(fs, ft).item()) < 2e-2 * max(1.0, sp_loss(fs, ft).item())


# ------------------------------------------------------------------------------------ recording
class _Net(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def test_feature_recorder_records_clears_removes() -> None:
    torch.manual_seed(4)
    net = _Net()
    x = torch.randn(2, 3, 8, 8)
    rec = FeatureRecorder(net, ["features.2", "features.4"])
    net(x)
    f2, f4 = rec.features()
    expected = net.features[:3](x)
    assert torch.allclose(f2, expected) and f4.shape == (2, 8, 4, 4)
    rec.clear()
    with pytest.raises(RuntimeError):
        rec.features()
    rec.remove()
    net(x)
    with pytest.raises(RuntimeError):
        rec.features()
    with pytest.raises(KeyError):
        FeatureRecorder(net, ["nope"])


def test_default_positions() -> None:
    net = _Net()
    assert default_positions(net, "stages") == ["features.2", "features.5"]
    assert default_positions(torchvision.models.resnet18(num_classes=3)) == ["layer1", "layer2", "layer3", "layer4"]
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 2))
    assert default_positions(mlp) == ["1", "3"]
    student = copy.deepcopy(net)
    expand_model(student, ratio=2)
    assert default_positions(student, "expanded") == ["features.0", "features.4"]
    with pytest.raises(ValueError):
        default_positions(net, "expanded")  # nothing expanded
    # an expanded layer feeding a pool counts as one leaf, so stage names still match the teacher
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4, 2))
    seq_student = copy.deepcopy(seq)
    expand_model(seq_student, ratio=2)
    assert default_positions(seq) == default_positions(seq_student) == ["0"]


# ---------------------------------------------------------------------------------------- SP-KD
def test_spkd_loss_value_and_gradients() -> None:
    torch.manual_seed(5)
    teacher = _Net(width=6)
    student = _Net(width=4)  # a "pruned" student: fewer channels, same module names
    positions = default_positions(student)
    spkd = SPKDLoss(teacher, student, positions, gamma=10.0)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(5, 3, 8, 8)
    student.train()
    out = student(x)
    loss = spkd(x)
    with torch.no_grad():
        ft = [teacher.features[:3](x), teacher.features[:6](x)]
    fs = [student.features[:3](x), student.features[:6](x)]
    expected = 10.0 * sum(sp_loss(s, t) for s, t in zip(fs, ft))
    spkd.clear()  # the manual forwards above went through the hooked modules too
    assert abs(loss.item() - expected.item()) < 1e-5 * max(1.0, expected.item())
    (loss + out.sum()).backward()
    assert student.features[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(RuntimeError):
        spkd(x)  # records cleared: the student has not run since
    spkd.remove()


def test_spkd_expanded_student_of_the_teacher() -> None:
    """At expansion the student computes the dense teacher's features: loss ~ 0; it grows once the student
    moves, and its gradient reaches all three factors of the expanded blocks."""
    torch.manual_seed(6)
    teacher = _Net().double()
    student = copy.deepcopy(teacher)
    expand_model(student, ratio=2)
    student.train()
    teacher.train()  # SPKDLoss must switch it to eval (BatchNorm running stats)
    spkd = SPKDLoss(teacher, student, default_positions(student, "expanded"), gamma=3000.0)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    student.eval()
    student(x)
    assert spkd(x).item() < 1e-18
    student.train()
    with torch.no_grad():
        student.features[0].middle.weight.add_(0.3 * torch.randn_like(student.features[0].middle.weight))
    teacher_out = spkd.run_teacher(x)
    assert teacher_out.shape == (4, 3)
    student(x)
    loss = spkd()  # teacher features from run_teacher
    assert loss.item() > 1e-6
    loss.backward()
    block = student.features[0]
    assert isinstance(block, ExpandedConv2d)
    for factor in (block.first, block.middle, block.last):
        assert factor.weight.grad.abs().sum() > 0
    assert not teacher.training


def test_spkd_rejects_bad_pairs() -> None:
    net = _Net()
    with pytest.raises(ValueError):
        SPKDLoss(net, net, ["features.2"])
    with pytest.raises(ValueError):
        SPKDLoss(_Net(), net, ["features.2"], ["features.2", "features.5"])


def test_recorder_keeps_pre_activation_output_despite_inplace_relu() -> None:
    """An in-place activation after the recorded layer must not overwrite the recorded features (else the
    features compared are post-ReLU, possibly all-zero rows whose normalisation has unbounded gradients)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 3), nn.ReLU(inplace=True), nn.Linear(3, 2))
    x = torch.randn(16, 5)
    expected = net[0](x).detach().clone()
    assert (expected < 0).any()  # the ReLU does change something
    with FeatureRecorder(net, ["0"]) as rec, FeatureRecorder(net, ["0"], detach=True) as rec_t:
        net(x)
        (f,), (ft,) = rec.features(), rec_t.features()
        assert torch.equal(f.detach(), expected) and torch.equal(ft, expected)
        f.pow(2).sum().backward()  # differentiable w.r.t. the layer's weights
        assert net[0].weight.grad is not None and net[0].weight.grad.abs().sum() > 0
