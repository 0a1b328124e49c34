"""Allocation: how a target sparsity is spread over layers, and how scores become masks.

Two kinds:
- ``global``: one threshold over the scores of all layers (the allocation is decided by the scores).
- quota allocations (``uniform``, ``erk``, ``igq``, ``uniform_plus``): per-layer sparsities s_l are a pure
  function of the layer shapes and the target (``layer_sparsities``), then each layer removes exactly
  floor(s_l * n_l) weights, those with the lowest scores.

In both cases weights already pruned (mask False) get score -inf, so masks are nested: a pruned weight stays
pruned. Ties are broken by ``torch.topk`` order (deterministic for a given device).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from prunelab.pruning.masks import MaskSet


class AllocationError(ValueError):
    """The allocation cannot reach the requested sparsity."""


def _masked_scores(scores: Mapping[str, torch.Tensor], masks: MaskSet) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in masks.items():
        if name not in scores:
            raise KeyError(f"scorer returned no score for prunable tensor {name!r}")
        s = scores[name].detach().to(torch.float64).reshape(m.shape).clone()
        s[~m.to(s.device)] = -math.inf
        s = torch.nan_to_num(s, nan=-math.inf)
        out[name] = s
    return out


def _keep_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    flat = scores.flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if keep > 0:
        mask[torch.topk(flat, keep, sorted=False).indices] = True
    return mask.view_as(scores)


class Allocation:
    """Base class: subclasses implement ``masks_from_scores``."""

    name = "base"

    def masks_from_scores(self, scores: Mapping[str, torch.Tensor], masks: MaskSet, sparsity: float) -> MaskSet:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class GlobalAllocation(Allocation):
    """Keep the ``round((1 - s) * N)`` highest scores over all prunable weights."""

    name = "global"

    def masks_from_scores(self, scores, masks, sparsity):
        s = _masked_scores(scores, masks)
        names = list(s)
        flat = torch.cat([s[n].flatten().cpu() for n in names])
        keep = int(round((1.0 - sparsity) * flat.numel()))
        keep = min(keep, int(sum(int(m.sum()) for m in masks.values())))
        kept = _keep_top(flat, keep)
        out, i = {}, 0
        for n in names:
            k = s[n].numel()
            out[n] = kept[i : i + k].view(s[n].shape).to(masks[n].device)
            i += k
        return MaskSet(out)


class QuotaAllocation(Allocation):
    """Per-layer quotas from ``layer_sparsities``; exactly floor(s_l * n_l) removed per layer."""

    def layer_sparsities(self, shapes: Mapping[str, Sequence[int]], sparsity: float) -> dict[str, float]:
        raise NotImplementedError

    def removal_counts(self, shapes: Mapping[str, Sequence[int]], sparsity: float) -> dict[str, int]:
        sl = self.layer_sparsities(shapes, sparsity)
        counts = {}
        for n, shape in shapes.items():
            if not (-1e-12 <= sl[n] <= 1.0 + 1e-12):
                raise AllocationError(f"allocation={self.name}: layer {n} would need sparsity {sl[n]:.4f}")
            counts[n] = int(math.floor(min(max(sl[n], 0.0), 1.0) * math.prod(shape) + 1e-9))
        return counts

    def masks_from_scores(self, scores, masks, sparsity):
        s = _masked_scores(scores, masks)
        counts = self.removal_counts({n: tuple(m.shape) for n, m in masks.items()}, sparsity)
        out = {}
        for n, m in masks.items():
            already = int((~m).sum())
            remove = max(counts[n], already)  # nested: never resurrect a pruned weight
            out[n] = _keep_top(s[n], m.numel() - remove).to(m.device)
        return MaskSet(out)


class UniformAllocation(QuotaAllocation):
    """Every layer at the target sparsity."""

    name = "uniform"

    def layer_sparsities(self, shapes, sparsity):
        return {n: float(sparsity) for n in shapes}


def _solve_capped(weights: dict[str, float], sizes: dict[str, int], keep_total: float, name: str) -> dict[str, float]:
    """Densities d_l = min(1, eps * w_l) with sum d_l n_l = keep_total: layers whose density would exceed 1
    are made dense and eps is re-solved over the others (repeat until no layer exceeds 1)."""
    dense: set[str] = set()
    while True:
        free = [n for n in sizes if n not in dense]
        budget = keep_total - sum(sizes[n] for n in dense)
        denom = sum(weights[n] * sizes[n] for n in free)
        if not free or budget < -1e-9 or denom <= 0:
            raise AllocationError(f"allocation={name} cannot reach the target sparsity on this network")
        eps = budget / denom
        over = [n for n in free if eps * weights[n] > 1.0]
        if not over:
            d = {n: 1.0 for n in dense}
            d.update({n: eps * weights[n] for n in free})
            return d
        dense.update(over)


class ERKAllocation(QuotaAllocation):
    """Erdős–Rényi-Kernel (Evci et al. 2020): density of layer l proportional to sum(shape_l) / prod(shape_l)
    (for a conv: (c_out + c_in + k_h + k_w) / (c_out c_in k_h k_w); for a linear layer: (n_out + n_in) /
    (n_out n_in)). Redistribution rule: a layer whose density would exceed 1 is made dense, and the
    proportionality constant is re-solved over the remaining layers, repeatedly (as in RigL's code)."""

    name = "erk"

    def layer_sparsities(self, shapes, sparsity):
        sizes = {n: math.prod(s) for n, s in shapes.items()}
        weights = {n: sum(s) / math.prod(s) for n, s in shapes.items()}
        d = _solve_capped(weights, sizes, (1.0 - sparsity) * sum(sizes.values()), self.name)
        return {n: 1.0 - d[n] for n in shapes}


class IGQAllocation(QuotaAllocation):
    """Ideal Gas Quotas (Vysogorets & Kempe 2023, Sec. 5): layer l with n_l weights keeps density
    d_l = 1 / (1 + F n_l), one constant F >= 0 for the whole network found by bisection (in log F) so that
    sum_l d_l n_l equals the kept count (1 - s) N."""

    name = "igq"

    @staticmethod
    def solve_F(sizes: Sequence[int], keep_total: float, tol: float = 1e-3) -> float:
        def kept(F: float) -> float:
            return sum(n / (1.0 + F * n) for n in sizes)

        total = float(sum(sizes))
        if keep_total >= total:
            return 0.0
        if keep_total <= 0:
            return math.inf
        lo, hi = 0.0, 1.0
        while kept(hi) > keep_total:
            hi *= 2.0
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if kept(mid) > keep_total:
                lo = mid
            else:
                hi = mid
            if abs(kept(mid) - keep_total) < tol:
                return mid
        return 0.5 * (lo + hi)

    def layer_sparsities(self, shapes, sparsity):
        sizes = {n: math.prod(s) for n, s in shapes.items()}
        F = self.solve_F(list(sizes.values()), (1.0 - sparsity) * sum(sizes.values()))
        return {n: 1.0 - 1.0 / (1.0 + F * sizes[n]) for n in shapes}


class UniformPlusAllocation(QuotaAllocation):
    """Uniform+ (Gale et al. 2019): first layer dense, last layer at most ``max_last`` sparse, every other
    layer at one common sparsity s' that absorbs the difference so the total meets the target."""

    name = "uniform_plus"

    def __init__(self, max_last: float = 0.8):
        self.max_last = max_last

    def layer_sparsities(self, shapes, sparsity):
        names = list(shapes)
        if len(names) < 3:
            raise AllocationError("allocation=uniform_plus needs at least three prunable layers")
        sizes = {n: math.prod(s) for n, s in shapes.items()}
        first, last, mid = names[0], names[-1], names[1:-1]
        remove = sparsity * sum(sizes.values())
        m = sum(sizes[n] for n in mid)
        # s' m + min(s', max_last) n_last = remove
        s_mid = remove / (m + sizes[last])
        if s_mid > self.max_last:
            s_mid = (remove - self.max_last * sizes[last]) / m
        if s_mid > 1.0 + 1e-12:
            raise AllocationError(
                f"allocation=uniform_plus cannot reach sparsity {sparsity} (first layer dense, last layer at "
                f"most {self.max_last} sparse); choose a lower prune.sparsity or another allocation"
            )
        out = {n: s_mid for n in mid}
        out[first] = 0.0
        out[last] = min(s_mid, self.max_last)
        return out


ALLOCATIONS = {
    c.name: c for c in (GlobalAllocation, UniformAllocation, ERKAllocation, IGQAllocation, UniformPlusAllocation)
}
