"""Similarity-preserving knowledge distillation (SP-KD) for fine-tuning over-parameterized pruned networks.

Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019, Eq. 1-4. For a mini-batch of ``b``
examples and the activation map ``A`` of one layer (any shape ``(b, ...)``):

    Q = A.reshape(b, -1),   G~ = Q Q^T,   G[i, :] = G~[i, :] / ||G~[i, :]||_2                 (Eq. 1-2)
    L_SP(G_T, G_S) = (1 / b^2) * ||G_T - G_S||_F^2                                           (Eq. 3)
    L = L_CE + gamma * sum over paired layers of L_SP                                        (Eq. 4)

Only the batch size must agree between student and teacher: the ``b x b`` similarity matrices compare
features with different channel counts or spatial sizes (a pruned student vs the dense teacher). Qian et al.
(arXiv 2204.11444, Sec. 3.2) use it so that every expanded block learns the data-to-data similarities of
the corresponding layer of the dense network; gamma = 3000 as in Tung & Mori.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunelab.finetune.overparam import EXPANDED_TYPES

__all__ = ["FeatureRecorder", "SPKDLoss", "default_positions", "similarity_matrix", "sp_loss"]

logger = logging.getLogger(__name__)

_POOLS = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_PASSIVE = (nn.Identity, nn.Flatten, nn.Dropout, nn.Dropout2d)
_STAGE_CONTAINERS = ("stages", "layers")
_LAYER_RE = re.compile(r"layer\d+")


# ------------------------------------------------------------------------------------------------ loss
def similarity_matrix(features: Tensor) -> Tensor:
    """Row-normalised batch similarity ``G = normalize(Q Q^T, dim=1)``, ``Q = features.reshape(b, -1)``
    (Tung & Mori 2019, Eq. 1-2). Half-precision inputs are promoted to float32."""
    q = features.reshape(features.shape[0], -1)
    if q.dtype in (torch.float16, torch.bfloat16):
        q = q.float()
    return F.normalize(q @ q.t(), p=2, dim=1)


def sp_loss(fs: Tensor, ft: Tensor) -> Tensor:
    """``L_SP = ||G_s - G_t||_F^2 / b^2`` (Tung & Mori 2019, Eq. 3) for student/teacher features of one layer.

    ``fs`` and ``ft`` are ``(b, ...)`` with the same ``b``; everything else may differ. The teacher features
    are detached (no gradient reaches the teacher); the loss is differentiable w.r.t. ``fs``. Computed
    outside autocast, in at least float32.
    """
    if fs.shape[0] != ft.shape[0]:
        raise ValueError(f"sp_loss: batch sizes differ (student {fs.shape[0]}, teacher {ft.shape[0]})")
    b = fs.shape[0]
    with torch.autocast(device_type=fs.device.type, enabled=False):
        g_s = similarity_matrix(fs)
        with torch.no_grad():
            g_t = similarity_matrix(ft.detach()).to(device=g_s.device, dtype=g_s.dtype)
        return (g_s - g_t).pow(2).sum() / (b * b)


# ----------------------------------------------------------------------------------------- recording
def _first_tensor(output: object) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"FeatureRecorder: cannot record a module output of type {type(output).__name__}")


class FeatureRecorder:
    """Forward hooks on named modules of ``model`` keeping each one's latest output.

    A module called several times in one forward keeps its last output; the output is copied when recorded,
    so in-place operations after the module (``ReLU(inplace=True)``) do not alter it. ``features()`` returns them in the
    order of ``positions``; ``clear()`` drops them (call it after each loss to free memory); ``remove()``
    removes the hooks (do it before :func:`~prunelab.finetune.overparam.merge_model` when hooking expanded
    blocks). Usable as a context manager (removes the hooks on exit).
    """

    def __init__(self, model: nn.Module, positions: Sequence[str], detach: bool = False) -> None:
        modules = dict(model.named_modules())
        missing = [p for p in positions if p not in modules]
        if missing:
            raise KeyError(f"FeatureRecorder: no module named {missing} in {type(model).__name__}")
        self.positions = list(positions)
        self.detach = detach
        self._features: dict[str, Tensor] = {}
        self._handles = [modules[p].register_forward_hook(self._hook(p)) for p in self.positions]

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            out = _first_tensor(output)
            # A copy, not the output itself: an in-place op right after the module (``ReLU(inplace=True)``)
            # would otherwise overwrite the recorded features with post-activation values. Those can be all
            # zero for some examples (e.g. a pruned layer with 3 units), where the row normalisation of the
            # similarity matrix has an unbounded gradient: SP-KD then diverges to NaN (seen on LeNet-5 at 90%
            # FLOPs pruned, docs/methods/overparam.md). The copy is differentiable for the student.
            self._features[name] = out.detach().clone() if self.detach else out.clone()

        return hook

    def features(self) -> list[Tensor]:
        """Recorded outputs, one per position (raises if some position has not run since ``clear()``)."""
        missing = [p for p in self.positions if p not in self._features]
        if missing:
            raise RuntimeError(f"FeatureRecorder: no output recorded for {missing}; run the model's forward first")
        return [self._features[p] for p in self.positions]

    def clear(self) -> None:
        self._features.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()

    def __enter__(self) -> FeatureRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


# ------------------------------------------------------------------------------------------ positions
def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Leaf modules in registration order, an expanded block counting as one leaf."""
    out: list[tuple[str, nn.Module]] = []
    blocks: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(b + ".") for b in blocks):
            continue
        if isinstance(mod, EXPANDED_TYPES):
            blocks.append(name)
            out.append((name, mod))
        elif not any(True for _ in mod.children()):
            out.append((name, mod))
    return out


def _stage_positions(model: nn.Module) -> list[str]:
    children = dict(model.named_children())
    layers = [n for n in children if _LAYER_RE.fullmatch(n)]
    if layers:  # torchvision / timm ResNets, CIFAR ResNets
        return layers
    for cname in _STAGE_CONTAINERS:  # timm ConvNeXt / RegNet / ... style ``stages.<i>``
        container = children.get(cname)
        if isinstance(container, (nn.Sequential, nn.ModuleList)) and len(container):
            return [f"{cname}.{n}" for n, _ in container.named_children()]
    leaves = _leaves(model)
    out: list[str] = []
    for i, (_, mod) in enumerate(leaves):  # VGG / LeNet: the leaf feeding each pooling layer
        if isinstance(mod, _POOLS) and i > 0:
            prev_name, prev = leaves[i - 1]
            if not isinstance(prev, _POOLS + _PASSIVE) and prev_name not in out:
                out.append(prev_name)
    if out:
        return out
    # No stage structure at all (MLPs): every conv/linear/expanded layer except the classifier.
    layers_ = [n for n, m in leaves if isinstance(m, (nn.Conv2d, nn.Linear) + EXPANDED_TYPES)]
    return layers_[:-1]


POSITION_MODES = ("stages", "last", "expanded")


def default_positions(model: nn.Module, mode: str = "stages") -> list[str]:
    """Module names whose outputs SP-KD compares.

    ``"last"``: the last of the ``"stages"`` positions only -- one feature, as RepDistiller's SP
    (``HobbitLong/RepDistiller`` ``train_student.py``: ``g_s = [feat_s[-2]]``, the output of the last stage before
    the final pooling); ``"stages"`` (prunelab's default) sums over every stage output as in Tung & Mori
    (2019, Eq. 4, for which their gamma = 3000 was tuned).

    ``"expanded"``: every ``ExpandedConv2d``/``ExpandedLinear`` block (registration order); call it on the
    expanded student (the dense teacher has plain layers at the same names).

    ``"stages"``, first rule that yields anything:
      1. top-level children named ``layer<k>`` (torchvision/timm ResNets: ``layer1..layer4``; CIFAR ResNets);
      2. the children of a top-level ``stages``/``layers`` container (timm ConvNeXt, RegNet, ...);
      3. for every pooling layer (max/avg/adaptive), the leaf module feeding it in registration order, unless
         that is another pooling/identity/flatten/dropout (VGG: the ReLU ending each block; LeNet-5: the two
         ReLUs before the pools); an expanded block counts as one leaf so names match the dense teacher;
      4. otherwise every conv/linear except the classifier (MLPs).
    Raises ``ValueError`` when nothing is found.
    """
    if mode == "expanded":
        out = [n for n, m in model.named_modules() if isinstance(m, EXPANDED_TYPES)]
    elif mode == "stages":
        out = _stage_positions(model)
    elif mode == "last":
        out = _stage_positions(model)[-1:]
    else:
        raise ValueError(f"default_positions: mode must be one of {', '.join(POSITION_MODES)}, got {mode!r}")
    if not out:
        raise ValueError(f"default_positions: no {mode!r} position found in {type(model).__name__}")
    return out


# ----------------------------------------------------------------------------------------------- SP-KD
class SPKDLoss:
    """``gamma * sum_l L_SP(student_l, teacher_l)`` over paired positions (Tung & Mori 2019, Eq. 4).

    The teacher is frozen (``eval()``, ``requires_grad=False``, forward under ``torch.no_grad``). Usage::

        logits = student(x)                      # the hooks record the student's features
        loss = ce(logits, y) + spkd(x)           # runs the teacher on x, compares, clears the records

    ``spkd()`` without ``x`` uses the teacher features of a previous ``spkd.run_teacher(x)`` (e.g. when the
    teacher's logits are needed too). Deliberately not an ``nn.Module``: assigning it to a LightningModule
    does not register the teacher's parameters in the student's optimiser or checkpoint; move the teacher
    with :meth:`to`.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        positions_student: Sequence[str],
        positions_teacher: Sequence[str] | None = None,
        gamma: float = 3000.0,
    ) -> None:
        if teacher is student:
            raise ValueError("SPKDLoss: the teacher must be a separate (dense) model, not the student")
        positions_teacher = list(positions_student if positions_teacher is None else positions_teacher)
        if len(positions_teacher) != len(positions_student) or not positions_teacher:
            raise ValueError(
                f"SPKDLoss: need as many (>0) teacher positions as student positions, "
                f"got {len(positions_teacher)} and {len(positions_student)}"
            )
        self.teacher = teacher
        self.gamma = float(gamma)
        self._freeze_teacher()
        self.student_recorder = FeatureRecorder(student, positions_student)
        self.teacher_recorder = FeatureRecorder(teacher, positions_teacher, detach=True)

    def _freeze_teacher(self) -> None:
        self.teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def run_teacher(self, x: Tensor) -> Tensor:
        """Teacher forward on ``x`` in eval mode without gradient (records its features); returns its output."""
        self.teacher.eval()
        with torch.no_grad():
            return self.teacher(x)

    def __call__(self, x: Tensor | None = None) -> Tensor:
        """SP-KD loss for the student's last forward; runs the teacher on ``x`` if given. Clears the records."""
        try:
            fs = self.student_recorder.features()
            if x is not None:
                self.run_teacher(x)
            ft = self.teacher_recorder.features()
            return self.gamma * torch.stack([sp_loss(s, t) for s, t in zip(fs, ft)]).sum()
        finally:
            self.clear()

    def clear(self) -> None:
        self.student_recorder.clear()
        self.teacher_recorder.clear()

    def remove(self) -> None:
        """Remove every hook (before merging the student)."""
        self.student_recorder.remove()
        self.teacher_recorder.remove()

    def to(self, *args: object, **kwargs: object) -> SPKDLoss:
        self.teacher.to(*args, **kwargs)
        return self
