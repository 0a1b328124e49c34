"""Effective sparsity (Vysogorets & Kempe, "Connectivity Matters", JMLR 24(99), 2023, arXiv 2107.02306).

Definition (paper, Sec. 3): a kept weight is *effective* iff it lies on at least one path from an input unit to
an output unit of the network; the effective sparsity is the fraction of prunable weights that are not
effective (pruned or inactive), and the effective compression is total / effective remaining.

Computation (one forward and one backward pass). Build a *linearised* copy of the network:

- every conv/linear weight := its mask as a float (0/1; prunable tensors absent from ``masks`` are all ones),
  every bias removed (zero);
- BatchNorm/LayerNorm/GroupNorm/InstanceNorm, Dropout and the non-linearities (ReLU, ReLU6, GELU, SiLU,
  LeakyReLU, ELU, Sigmoid, Tanh, Hardswish, ...) become ``nn.Identity``;
- max-pooling becomes average-pooling with the same kernel/stride/padding (adaptive max -> adaptive avg);
  zero padding, average pooling, flattening and residual additions are kept.

Every quantity is then non-negative, and for non-negative operands a sum/product is positive iff one of its
terms is, so positivity = reachability. Push an all-ones input (batch 1) forward and ``sum(outputs)``
backward: the activation of a unit is > 0 iff some input unit reaches it, the gradient at a unit is > 0 iff
it reaches some output unit. For a weight ``W[j, i, kh, kw]`` autograd gives
``grad_W[j, i, kh, kw] = sum_pos input[i, pos + tap] * grad_out[j, pos]``, which is > 0 iff at some position
the tap sees a reachable input and feeds a unit that reaches an output, i.e. exactly iff the connection is on
an input -> output path. Hence ``effective = mask & (grad_W > 0)``. A tap that only ever sees zero padding is
inactive (e.g. a 3x3 conv on a 1x1 map keeps only its centre tap).

Exactness: a forward hook on *every* module replaces its output by the binarised ``(out > 0)`` through a
straight-through construction ``bin + (out - out.detach())`` (the value is exactly 0/1, the gradient passes
unchanged) and registers a tensor hook that binarises the gradient arriving at that output. Values therefore
stay in {0, 1} between modules; inside one module they are sums of at most fan-in products of 0/1 numbers
(integers < 2^24, exact in float32) or averages over a pooling window (>= 1/window, far from underflow).
Because every term is non-negative, no summation order or rounding can turn a positive sum into zero or a
zero sum into a positive one, so float32 is exact for the zero/non-zero pattern and is the default
(float64 costs 4-30x more on CPU for the same answer; ``tests/test_effective.py`` compares both on VGG-19 and
ResNet-50 at 99% sparsity). Transform-based convolutions (Winograd/FFT) would break that argument (their
coefficients have both signs), so cuDNN is disabled during the computation; CPU convolutions (oneDNN
direct / im2col + GEMM) only sum non-negative products.

Limitation: only *modules* can be replaced. A non-linearity called functionally inside ``forward``
(``F.relu(x)``, ``x.clamp(min=0)``, ``F.max_pool2d``) is not linearised; a ReLU applied to non-negative values
is the identity anyway, but a functional max-pool routes the gradient to one arg-max only and would
under-count paths. The registry models (LeNets, VGG, torchvision and CIFAR ResNets) use modules throughout.
Parameters of other module types (e.g. a ViT's positional embedding or layer scale) are left as they are
(with a warning); attention/softmax blocks are not path-linear and are not supported.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

_WEIGHTED: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)
_TO_IDENTITY: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Softplus,
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.dropout._DropoutNd,
)
_MAXPOOL_TO_AVG: dict[type[nn.Module], type[nn.Module]] = {
    nn.MaxPool1d: nn.AvgPool1d,
    nn.MaxPool2d: nn.AvgPool2d,
    nn.MaxPool3d: nn.AvgPool3d,
}
_ADAPTIVE_MAX_TO_AVG: dict[type[nn.Module], type[nn.Module]] = {
    nn.AdaptiveMaxPool1d: nn.AdaptiveAvgPool1d,
    nn.AdaptiveMaxPool2d: nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool3d: nn.AdaptiveAvgPool3d,
}
_PASSIVE: tuple[type[nn.Module], ...] = _TO_IDENTITY + tuple(_MAXPOOL_TO_AVG) + tuple(_ADAPTIVE_MAX_TO_AVG)


def _linear_replacement(m: nn.Module) -> nn.Module | None:
    """The module replacing ``m`` in the linearised network, or None to keep ``m``."""
    if isinstance(m, _TO_IDENTITY):
        return nn.Identity()
    for src, dst in _MAXPOOL_TO_AVG.items():
        if isinstance(m, src):
            dilation = m.dilation if isinstance(m.dilation, int) else max(m.dilation)
            if dilation != 1:
                raise NotImplementedError(f"effective sparsity: dilated max-pooling is not supported ({m})")
            return dst(m.kernel_size, m.stride, m.padding, ceil_mode=m.ceil_mode, count_include_pad=True)
    for src, dst in _ADAPTIVE_MAX_TO_AVG.items():
        if isinstance(m, src):
            return dst(m.output_size)
    return None


def _placeholder_memo(model: nn.Module) -> dict[int, Any]:
    """``deepcopy`` memo mapping the tensors the linearisation discards or overwrites (conv/linear weights and
    biases, norm-layer parameters and buffers) to empty placeholders, so that the copy does not duplicate
    them."""
    memo: dict[int, Any] = {}
    for m in model.modules():
        if isinstance(m, _WEIGHTED) or isinstance(m, _PASSIVE):
            for p in m.parameters(recurse=False):
                memo[id(p)] = nn.Parameter(torch.empty(0), requires_grad=False)
            for b in m.buffers(recurse=False):
                memo[id(b)] = torch.empty(0)
    return memo


def _ones(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """All-ones tensor as a stride-0 view (no memory): the weight of a dense (unmasked) layer."""
    return torch.ones((), dtype=dtype, device=device).expand(*shape)


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor, requires_grad: bool) -> None:
    prefix, _, attr = name.rpartition(".")
    mod = root.get_submodule(prefix) if prefix else root
    setattr(mod, attr, nn.Parameter(value, requires_grad=requires_grad))


def _replace_modules(root: nn.Module) -> None:
    for m in list(root.modules()):
        for cname, child in list(m.named_children()):
            new = _linear_replacement(child)
            if new is not None:
                setattr(m, cname, new)


def _binarise_output(module: nn.Module, args: Any, out: Any) -> Any:
    """Forward hook: value 1[out > 0] with the identity gradient, and binarise the gradient arriving here."""
    if not (isinstance(out, torch.Tensor) and out.is_floating_point()):
        return out
    if not out.requires_grad:
        return out.gt(0).to(out.dtype)
    d = out.detach()
    b = d.gt(0).to(d.dtype) + (out - d)
    b.register_hook(lambda g: g.gt(0).to(g.dtype))
    return b


class EffectiveSparsity:
    """A linearised copy of ``model`` built once, evaluated for any number of mask sets of ``model``.

    ``EffectiveSparsity(model, input_shape)(masks)`` returns the effective masks (see the module docstring).
    Building is one ``deepcopy`` without the weight tensors; each call is one forward and one backward pass.
    """

    def __init__(self, model: nn.Module, input_shape: Sequence[int], dtype: torch.dtype = torch.float32):
        self.input_shape = tuple(int(s) for s in input_shape)
        self.dtype = dtype
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.net = copy.deepcopy(model, memo=_placeholder_memo(model))
        _replace_modules(self.net)
        self.weight_names: list[str] = []
        for mname, m in self.net.named_modules():
            if isinstance(m, _WEIGHTED):
                w = model.get_submodule(mname).weight
                m.weight = nn.Parameter(_ones(w.shape, dtype, w.device), requires_grad=False)
                if m.bias is not None:
                    m.bias = None
                self.weight_names.append(f"{mname}.weight" if mname else "weight")
        others = [
            n for n, p in self.net.named_parameters() if p.is_floating_point() and n not in self.weight_names
        ]
        if others:
            logger.warning(
                "effective sparsity: parameters left unchanged in the linearised copy: %s", others[:5]
            )
        self.net.to(dtype=dtype).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        for m in self.net.modules():
            m.register_forward_hook(_binarise_output)

    def reach(self, masks: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
        """(effective masks, connected): ``connected`` is False when no input -> output path remains."""
        names = list(masks)
        params = []
        for n in names:
            m = masks[n].to(device=self.device)
            _set_tensor(self.net, n, m.to(self.dtype), requires_grad=True)
            params.append(self.net.get_parameter(n))
        x = torch.ones((1, *self.input_shape), dtype=self.dtype, device=self.device)
        with torch.enable_grad(), torch.backends.cudnn.flags(enabled=False):
            out = self.net(x)
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"effective sparsity needs a model returning one tensor, got {type(out)}")
            connected = bool(out.detach().gt(0).any())
            if not out.requires_grad:  # nothing depends on the masked weights
                grads: Sequence[torch.Tensor | None] = [None] * len(params)
            else:
                grads = torch.autograd.grad(out.sum(), params, allow_unused=True)
        eff = {}
        for n, p, g in zip(names, params, grads):
            keep = masks[n].to(device=self.device, dtype=torch.bool)
            eff[n] = keep & g.gt(0) if g is not None else torch.zeros_like(keep)
            _set_tensor(self.net, n, _ones(p.shape, self.dtype, p.device), requires_grad=False)
        return eff, connected

    def __call__(self, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.reach(masks)[0]


def path_linear(model: nn.Module) -> bool:
    """Whether the effective analysis applies to ``model``: no attention block (``nn.MultiheadAttention`` or
    a module whose class name ends in ``Attention``, as timm's), which is not path-linear (see above).
    :func:`effective_sparsity_report` falls back to the direct figures otherwise."""
    return not any(isinstance(m, nn.MultiheadAttention) or type(m).__name__.endswith("Attention")
                   for m in model.modules())


def effective_masks(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    input_shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Effective masks: ``masks[n] & (weight n lies on some input -> output path)`` for every ``n`` in
    ``masks`` (bool tensors, True = kept). ``input_shape`` is (C, H, W) without the batch dimension."""
    return EffectiveSparsity(model, input_shape, dtype)(masks)


def report_from_effective(
    masks: Mapping[str, torch.Tensor], eff: Mapping[str, torch.Tensor], connected: bool
) -> dict[str, Any]:
    """Statistics of a mask set and its effective masks (see :func:`effective_sparsity_report`)."""
    layers = []
    for n, m in masks.items():
        layers.append(
            {
                "name": n,
                "shape": list(m.shape),
                "numel": m.numel(),
                "remaining": int(m.sum()),
                "effective_remaining": int(eff[n].sum()),
            }
        )
    total = sum(lay["numel"] for lay in layers)
    rem = sum(lay["remaining"] for lay in layers)
    eff_rem = sum(lay["effective_remaining"] for lay in layers)
    return {
        "numel": total,
        "remaining": rem,
        "effective_remaining": eff_rem,
        "sparsity_direct": 1.0 - rem / total if total else 0.0,
        "sparsity_effective": 1.0 - eff_rem / total if total else 0.0,
        "compression_direct": total / rem if rem else math.inf,
        "compression_effective": total / eff_rem if eff_rem else math.inf,
        "layer_collapse": not connected,
        "layers": layers,
    }


def effective_sparsity_report(
    model: nn.Module, masks: Mapping[str, torch.Tensor], input_shape: Sequence[int]
) -> dict[str, Any]:
    """Direct and effective sparsity of ``masks`` on ``model``.

    Keys: ``numel``, ``remaining``, ``effective_remaining``, ``sparsity_direct``, ``sparsity_effective``,
    ``compression_direct``, ``compression_effective`` (total / effective remaining, ``math.inf`` when nothing
    effective remains), ``layer_collapse`` (True when no input -> output path remains) and ``layers``: one dict
    per tensor with ``name``, ``shape``, ``numel``, ``remaining``, ``effective_remaining``.

    A model with attention (not :func:`path_linear`) gets its direct figures as the effective ones, with a
    warning: the path count through a softmax is not the paper's definition and would be wrong either way.
    """
    if not path_linear(model):
        logger.warning("effective sparsity: %s has attention blocks, which are not path-linear; reporting the "
                       "direct sparsity as the effective one", type(model).__name__)
        return report_from_effective(masks, masks, connected=True)
    eff, connected = EffectiveSparsity(model, input_shape).reach(masks)
    return report_from_effective(masks, eff, connected)
