"""Linear over-parameterization of compact layers for fine-tuning, and the exact merge back.

Qian et al., "Boosting Pruned Networks with Linear Over-parameterization" (arXiv 2204.11444), Sec. 3.1:
every compact ``k x k`` convolution ``W`` (``m -> n`` channels) of a pruned network is replaced, for the
fine-tuning only, by three consecutive *linear* layers with no non-linearity between them

    1x1 conv ``A`` (m -> r*m)  ->  k x k conv ``W2`` (r*m -> r*n, stride s)  ->  1x1 conv ``C`` (r*n -> n)

(a linear layer ``m -> n`` likewise by ``Linear(m, r*m) -> Linear(r*m, r*n) -> Linear(r*n, n)``), initialised
so that the block computes exactly the compact layer. After fine-tuning, the block is re-parameterised
("merged") into one layer of the original shape: for every spatial tap ``(i, j)``

    W[:, :, i, j] = C @ W2[:, :, i, j] @ A                                            (merge, Eq. 3-4)

Initialisation (Eq. 2 read backwards): ``A`` and ``C`` are random full-rank matrices (orthonormal columns
resp. rows, so well conditioned) and ``W2[:, :, i, j] = pinv(C) @ W[:, :, i, j] @ pinv(A)``; because ``A``
has full column rank and ``C`` full row rank, ``pinv(A) @ A = I_m`` and ``C @ pinv(C) = I_n``, hence
``C @ W2 @ A = W`` exactly (up to rounding; the pseudo-inverses are computed in float64). A zero-padded
identity is deliberately *not* used: its extra rows/columns would receive zero gradient forever.

Padding. The original padding ``p`` (and ``padding_mode``) is applied by the FIRST 1x1 factor, the middle
``k x k`` conv has padding 0. A bias-free pointwise linear map commutes with zero padding (and with
reflect/replicate/circular padding), so the block equals the original conv everywhere, borders included.
With the padding on the first factor, the composition stays exact even when the first factor has a bias
``b1``: the 1x1 conv maps a padded zero pixel to ``b1``, i.e. it computes ``A pad(x) + b1`` uniformly, and
the merged bias below is exact. Had the padding been put on the ``k x k`` conv instead, the middle conv would
see zeros, not ``b1``, at the border and no single conv could reproduce the block there. The first factor
has no bias by default (``bias_first=False``), the middle one neither (``bias_middle=False``); the last one
carries the original bias.

Merged bias (biases ``b1``, ``b2``, ``b3`` of the three factors, absent ones = 0, ``W2_sum`` = middle
kernel summed over its spatial taps):

    b = C (W2_sum b1 + b2) + b3.

Masks. Merging produces, in general, a DENSE weight even if the compact layer was unstructured-sparse:
``C @ W2 @ A`` has no reason to keep the zeros of ``W``. :func:`remask` multiplies the merged weights by
the original model's masks (parameter-name keyed, ``True`` = kept) if the user wants the sparsity back.
Structured (channel) pruning is unaffected: the merged layer has the compact shape.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

__all__ = [
    "ExpandedConv2d",
    "ExpandedLinear",
    "count_params",
    "expand_model",
    "merge_model",
    "remask",
    "expandable_modules",
]

logger = logging.getLogger(__name__)

_WILDCARDS = set("*?[")


# --------------------------------------------------------------------------------------------- algebra
def _random_factors(
    m: int, n: int, ratio: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Random full-rank outer factors in float64: ``A`` (r*m x m, orthonormal columns) and ``C``
    (n x r*n, orthonormal rows). Orthonormality keeps the block as well conditioned as the compact layer."""
    a = torch.empty(ratio * m, m, dtype=torch.float64)
    c = torch.empty(n, ratio * n, dtype=torch.float64)
    nn.init.orthogonal_(a, generator=generator)
    nn.init.orthogonal_(c, generator=generator)
    return a, c


def _left_pinv(a: Tensor) -> Tensor:
    """Moore-Penrose pseudo-inverse of a full-column-rank ``a``: ``(a^T a)^-1 a^T`` (then ``pinv(a) a = I``).

    Same value as ``torch.linalg.pinv`` for such matrices, but a small ``m x m`` solve instead of an SVD of the
    tall ``r*m x m`` factor (several times faster for wide layers)."""
    return torch.linalg.solve(a.t() @ a, a.t())


def _right_pinv(c: Tensor) -> Tensor:
    """Moore-Penrose pseudo-inverse of a full-row-rank ``c``: ``c^T (c c^T)^-1`` (then ``c pinv(c) = I``)."""
    return torch.linalg.solve(c @ c.t(), c).t()


def _middle_from(weight: Tensor, a: Tensor, c: Tensor) -> Tensor:
    """``W2[..., taps] = pinv(C) @ W[..., taps] @ pinv(A)`` in float64, so that ``C @ W2 @ A = W``.

    ``weight`` is ``(n, m, *taps)``, ``a`` is ``(r*m, m)`` (full column rank), ``c`` is ``(n, r*n)`` (full row
    rank); returns ``(r*n, r*m, *taps)``.
    """
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    return torch.einsum("pn,nm...,mq->pq...", _right_pinv(c), w, _left_pinv(a))


def _compose(a: Tensor, w2: Tensor, c: Tensor) -> Tensor:
    """``W[..., taps] = C @ W2[..., taps] @ A`` (the merge of Eq. 3-4); all float64."""
    return torch.einsum("np,pq...,qm->nm...", c, w2, a)


def _composed_bias(
    c: Tensor, w2: Tensor, b1: Tensor | None, b2: Tensor | None, b3: Tensor | None
) -> Tensor | None:
    """Merged bias ``C (W2_sum b1 + b2) + b3`` (float64), ``None`` when no factor has a bias."""
    if b1 is None and b2 is None and b3 is None:
        return None
    inner = torch.zeros(w2.shape[0], dtype=torch.float64)
    if b1 is not None:
        w2_sum = w2.reshape(w2.shape[0], w2.shape[1], -1).sum(dim=2)  # sum over spatial taps
        inner = inner + w2_sum @ b1
    if b2 is not None:
        inner = inner + b2
    out = c @ inner
    if b3 is not None:
        out = out + b3
    return out


def _f64(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().to(device="cpu", dtype=torch.float64)


def _is_channels_last(weight: Tensor) -> bool:
    return weight.dim() == 4 and not weight.is_contiguous() and weight.is_contiguous(
        memory_format=torch.channels_last
    )


def _copy_(dst: Tensor, src: Tensor) -> None:
    with torch.no_grad():
        dst.copy_(src.to(device=dst.device, dtype=dst.dtype))


# ------------------------------------------------------------------------------------------- modules
def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """The conv's padding as two ints (``"valid"`` -> 0, ``"same"`` -> symmetric ``(k-1)/2`` for odd k)."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        if all(k % 2 == 1 for k in conv.kernel_size) and tuple(conv.stride) == (1, 1):
            return tuple(d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation))  # type: ignore
        raise NotImplementedError(f"padding='same' with kernel {conv.kernel_size} is not symmetric")
    return (int(conv.padding[0]), int(conv.padding[1]))


class ExpandedConv2d(nn.Module):
    """``1x1 (m -> r*m, padding p) -> k x k (r*m -> r*n, stride s, padding 0) -> 1x1 (r*n -> n, bias)``.

    Linear over-parameterization of one ``nn.Conv2d`` (Qian et al. 2022, Sec. 3.1); see the module docstring
    for why the padding sits on the first factor. Attributes ``first``, ``middle``, ``last`` are plain
    ``nn.Conv2d`` modules, so optimisers, weight decay and hooks see ordinary parameters.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        ratio: int = 4,
        bias: bool = True,
        bias_first: bool = False,
        bias_middle: bool = False,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if ratio < 1:
            raise ValueError(f"expansion ratio must be >= 1, got {ratio}")
        kw = {"device": device, "dtype": dtype}
        m, n, r = in_channels, out_channels, ratio
        self.ratio = r
        self.first = nn.Conv2d(m, r * m, 1, padding=padding, bias=bias_first, padding_mode=padding_mode, **kw)
        self.middle = nn.Conv2d(r * m, r * n, kernel_size, stride=stride, padding=0, dilation=dilation,
                                bias=bias_middle, **kw)
        self.last = nn.Conv2d(r * n, n, 1, bias=bias, **kw)
        self.channels_last = False

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        ratio: int = 4,
        generator: torch.Generator | None = None,
        bias_first: bool = False,
        bias_middle: bool = False,
    ) -> ExpandedConv2d:
        """Block computing exactly ``conv`` (any float dtype/device/memory format is preserved).

        Factors: ``A``, ``C`` random orthonormal, ``W2 = pinv(C) W pinv(A)`` per tap (float64, then cast);
        optional ``b1``/``b2`` start at zero and ``b3`` is the conv's bias.
        """
        if conv.groups != 1:
            raise ValueError(f"cannot expand a grouped conv (groups={conv.groups})")
        w = conv.weight
        block = cls(
            conv.in_channels, conv.out_channels, tuple(conv.kernel_size), tuple(conv.stride),
            _conv_padding(conv), tuple(conv.dilation), ratio, conv.bias is not None, bias_first, bias_middle,
            conv.padding_mode, device=w.device, dtype=w.dtype,
        )
        a, c = _random_factors(conv.in_channels, conv.out_channels, ratio, generator)
        w2 = _middle_from(w, a, c)
        _copy_(block.first.weight, a[:, :, None, None])
        _copy_(block.middle.weight, w2)
        _copy_(block.last.weight, c[:, :, None, None])
        for b in (block.first.bias, block.middle.bias):
            if b is not None:
                nn.init.zeros_(b)
        if conv.bias is not None:
            _copy_(block.last.bias, conv.bias)
        if _is_channels_last(w):
            block.to(memory_format=torch.channels_last)
            block.channels_last = True
        block.train(conv.training)
        return block

    def forward(self, x: Tensor) -> Tensor:
        return self.last(self.middle(self.first(x)))

    @torch.no_grad()
    def merge(self) -> nn.Conv2d:
        """Single ``nn.Conv2d`` of the original shape computing the block (composed in float64)."""
        a = _f64(self.first.weight)[:, :, 0, 0]
        c = _f64(self.last.weight)[:, :, 0, 0]
        w2 = _f64(self.middle.weight)
        bias = _composed_bias(c, w2, _f64(self.first.bias), _f64(self.middle.bias), _f64(self.last.bias))
        ref = self.middle.weight
        conv = nn.Conv2d(
            self.first.in_channels, self.last.out_channels, self.middle.kernel_size, stride=self.middle.stride,
            padding=self.first.padding, dilation=self.middle.dilation, bias=bias is not None,
            padding_mode=self.first.padding_mode, device=ref.device, dtype=ref.dtype,
        )
        _copy_(conv.weight, _compose(a, w2, c))
        if bias is not None:
            _copy_(conv.bias, bias)
        if self.channels_last:
            conv.to(memory_format=torch.channels_last)
        conv.train(self.training)
        return conv


class ExpandedLinear(nn.Module):
    """``Linear(m, r*m, no bias) -> Linear(r*m, r*n) -> Linear(r*n, n, bias)`` (Qian et al. 2022, Sec. 3.1)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        ratio: int = 4,
        bias: bool = True,
        bias_first: bool = False,
        bias_middle: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if ratio < 1:
            raise ValueError(f"expansion ratio must be >= 1, got {ratio}")
        kw = {"device": device, "dtype": dtype}
        m, n, r = in_features, out_features, ratio
        self.ratio = r
        self.first = nn.Linear(m, r * m, bias=bias_first, **kw)
        self.middle = nn.Linear(r * m, r * n, bias=bias_middle, **kw)
        self.last = nn.Linear(r * n, n, bias=bias, **kw)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        ratio: int = 4,
        generator: torch.Generator | None = None,
        bias_first: bool = False,
        bias_middle: bool = False,
    ) -> ExpandedLinear:
        """Block computing exactly ``linear``: ``A``, ``C`` random orthonormal, ``W2 = pinv(C) W pinv(A)``."""
        w = linear.weight
        block = cls(linear.in_features, linear.out_features, ratio, linear.bias is not None, bias_first,
                    bias_middle, device=w.device, dtype=w.dtype)
        a, c = _random_factors(linear.in_features, linear.out_features, ratio, generator)
        _copy_(block.first.weight, a)
        _copy_(block.middle.weight, _middle_from(w, a, c))
        _copy_(block.last.weight, c)
        for b in (block.first.bias, block.middle.bias):
            if b is not None:
                nn.init.zeros_(b)
        if linear.bias is not None:
            _copy_(block.last.bias, linear.bias)
        block.train(linear.training)
        return block

    from_conv = from_linear  # uniform spelling for generic callers

    def forward(self, x: Tensor) -> Tensor:
        return self.last(self.middle(self.first(x)))

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """Single ``nn.Linear`` of the original shape computing the block (composed in float64)."""
        a, w2, c = _f64(self.first.weight), _f64(self.middle.weight), _f64(self.last.weight)
        bias = _composed_bias(c, w2, _f64(self.first.bias), _f64(self.middle.bias), _f64(self.last.bias))
        ref = self.middle.weight
        lin = nn.Linear(self.first.in_features, self.last.out_features, bias=bias is not None,
                        device=ref.device, dtype=ref.dtype)
        _copy_(lin.weight, _compose(a, w2, c))
        if bias is not None:
            _copy_(lin.bias, bias)
        lin.train(self.training)
        return lin


EXPANDED_TYPES = (ExpandedConv2d, ExpandedLinear)


# ------------------------------------------------------------------------------------- model surgery
def _is_expandable(module: nn.Module) -> bool:
    """Exactly ``nn.Conv2d`` (groups 1, dilation 1) or ``nn.Linear``.

    Subclasses are excluded on purpose: e.g. timm's ``Conv2dSame`` / ``StdConv2d`` override ``forward``
    (dynamic padding, weight standardisation), which a plain three-factor block would not reproduce.
    """
    if type(module) is nn.Conv2d:
        return module.groups == 1 and tuple(module.dilation) == (1, 1)
    return type(module) is nn.Linear


def _named_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv2d/Linear modules (any kind) in registration order, outside already expanded blocks."""
    out: list[tuple[str, nn.Module]] = []
    inside: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(mod, EXPANDED_TYPES):
            inside.append(name)
        elif isinstance(mod, (nn.Conv2d, nn.Linear)):
            out.append((name, mod))
    return out


def expandable_modules(model: nn.Module) -> list[str]:
    """Names the ``"auto"`` rule expands: every expandable conv/linear except the classifier, i.e. the last
    ``Conv2d``/``Linear`` in module registration order."""
    layers = _named_layers(model)
    if not layers:
        return []
    classifier = layers[-1][0]
    return [name for name, mod in layers if name != classifier and name and _is_expandable(mod)]


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def _select_listed(model: nn.Module, layers: list[str]) -> list[str]:
    """Names (in registration order) selected by exact module names and/or fnmatch patterns."""
    candidates = [(n, m) for n, m in _named_layers(model) if n]
    by_name = dict(candidates)
    chosen: set[str] = set()
    for pat in layers:
        if not _WILDCARDS & set(pat):
            if pat not in by_name or not _is_expandable(by_name[pat]):
                raise ValueError(f"expand_model: {pat!r} is not an expandable Conv2d/Linear of the model")
            chosen.add(pat)
            continue
        hits = {n for n, m in candidates if _is_expandable(m) and fnmatch.fnmatchcase(n, pat)}
        if not hits:
            logger.warning("expand_model: pattern %r matches no expandable layer", pat)
        chosen |= hits
    return [n for n, _ in candidates if n in chosen]


def _select(model: nn.Module, layers: str | list[str], exclude: list[str] | None) -> list[str]:
    if layers == "auto":
        selected = expandable_modules(model)
    else:
        selected = _select_listed(model, [layers] if isinstance(layers, str) else list(layers))
    if exclude:
        selected = [n for n in selected if not _matches(n, exclude)]
    return selected


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def expand_model(
    model: nn.Module,
    ratio: int = 4,
    layers: str | list[str] = "auto",
    exclude: list[str] | None = None,
    generator: torch.Generator | None = None,
    bias_middle: bool = False,
) -> list[str]:
    """Replace, in place, the selected layers by their expanded blocks; return the expanded names.

    ``layers="auto"`` selects every plain ``nn.Conv2d`` (groups 1, dilation 1) and ``nn.Linear`` except the
    classifier (the last conv/linear in registration order); a list selects module names and/or fnmatch
    patterns (an exact name that is not an expandable layer raises, a pattern matching nothing logs a
    warning; patterns may match the classifier). ``exclude`` removes names/patterns from the selection.
    Layers following the expanded one (BatchNorm, activation) are untouched. The function of the model is
    unchanged up to float rounding; the optimiser must be rebuilt afterwards.
    """
    names = _select(model, layers, exclude)
    for name in names:
        mod = model.get_submodule(name)
        if isinstance(mod, nn.Conv2d):
            block: nn.Module = ExpandedConv2d.from_conv(mod, ratio, generator, bias_middle=bias_middle)
        else:
            block = ExpandedLinear.from_linear(mod, ratio, generator, bias_middle=bias_middle)
        _replace(model, name, block)
    logger.info("expanded %d layers (ratio %d)", len(names), ratio)
    return names


def merge_model(model: nn.Module) -> list[str]:
    """Replace, in place, every ``ExpandedConv2d``/``ExpandedLinear`` by its merged plain layer.

    Returns the merged names. The merged weights are dense in general; see :func:`remask`.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, EXPANDED_TYPES)]
    if "" in names:
        raise ValueError("merge_model: the model itself is an expanded block; call its .merge()")
    for name in names:
        _replace(model, name, model.get_submodule(name).merge())
    logger.info("merged %d expanded blocks", len(names))
    return names


@torch.no_grad()
def remask(model: nn.Module, masks: Mapping[str, Tensor]) -> list[str]:
    """Multiply, in place, the parameters named in ``masks`` (bool, ``True`` = kept) by their masks.

    Meant for a merged model (names of the original model): merging an expanded block gives a dense weight
    in general, and the pipeline re-imposes the unstructured mask only when the user asks. Raises
    ``KeyError`` for a name that is not a parameter of ``model`` (e.g. the model is still expanded) and
    ``ValueError`` for a shape mismatch. Returns the names re-masked.
    """
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        if name not in params:
            raise KeyError(f"remask: {name!r} is not a parameter of the model (merge it first?)")
        p = params[name]
        if tuple(mask.shape) != tuple(p.shape):
            raise ValueError(f"remask: mask {name!r} has shape {tuple(mask.shape)}, parameter {tuple(p.shape)}")
        p.mul_(mask.to(device=p.device, dtype=p.dtype))
    return list(masks)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of (distinct) parameter elements of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)

