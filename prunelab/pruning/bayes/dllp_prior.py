"""Function-based unit importances for DLLP's prior: what the *data* says a unit of the given network is for.

Both criteria are measured through DLLP's own gates (a multiplier ``g_u`` on the unit's output, after its
BatchNorm when it has one; :class:`~prunelab.pruning.bayes.dllp.DLLPModel`), at ``g = 1`` (the vanilla
network), in eval mode (running BatchNorm statistics, no dropout: the function that will be deployed), on a
few fixed training batches (``E_b`` the mean cross-entropy of batch ``b``):

* ``taylor``: ``I_u = sqrt(mean_b (g_u dE_b/dg_u)^2)`` at ``g = 1`` -- the first-order Taylor estimate of the
  loss change when the unit is removed (Molchanov et al., CVPR 2019, Eq. 3/7), squared per batch and averaged.
  It is squared *per batch*, not summed first: at a stationary point of the training loss ``sum_b g dE_b/dg
  = sum_s w_s dE/dw_s = 0`` for every unit whose incoming weights were trained, so the summed first-order
  term carries no information; its per-batch fluctuation does. One backward per batch.
* ``ablation``: ``I_u = mean_b [E_b(g_u = 0) - E_b(g = 1)]`` -- the exact loss increase when the unit alone is
  removed (the "oracle" of Molchanov et al.). ``U + 1`` forwards per batch, batched over units
  (``chunk`` gate sets per forward); meant for small networks.

**Scale invariance** (why these and not ``l2``/``bn``). For a positively homogeneous activation (ReLU) a
function-preserving rescaling of a unit -- incoming row and bias ``x c``, outgoing column ``x 1/c``, ``c > 0``
-- leaves the network's output unchanged for *every* value of the unit's gate, because
``(1/c) W_out relu(g c a) = W_out relu(g a)``. Hence ``E(g)`` is the same function of ``g`` before and after the
rescaling, and so are ``dE/dg`` and ``E(g_u = 0)``: both importances are invariant (up to floating-point
rounding). The incoming-weight norm is multiplied by ``c``; ``|gamma|`` by ``c`` for the rescaling of a
BatchNorm's ``(gamma, beta)``: magnitude priors are not invariant, and a unit that the function needs can look
unimportant to them.

The prior standardises ``log I`` within each layer (:func:`~prunelab.pruning.bayes.dllp.prior_keep_prob`).
A unit with ``I = 0`` (dead ReLU, or removal does not increase the loss) would send ``log I`` to ``-inf``;
importances are floored at ``1e-6`` times the layer's largest (:func:`floored`), so such units share the
lowest score.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["FUNCTION_IMPORTANCES", "floored", "function_importance"]

FUNCTION_IMPORTANCES = ("taylor", "ablation")
FLOOR = 1e-6


def floored(imp: Tensor, rel: float = FLOOR) -> Tensor:
    """``max(I, rel * max(I))`` (and at least 1e-30): zero or negative importances become the layer's floor."""
    top = float(imp.max()) if imp.numel() else 0.0
    return imp.clamp_min(max(rel * top, 1e-30))


def _ones(dmodel: Any, n: int, device, dtype) -> dict[str, Tensor]:
    return {s.name: torch.ones(n, s.units, device=device, dtype=dtype) for s in dmodel.sites}


def function_importance(
    dmodel: Any, batches: Iterable[tuple[Tensor, Tensor]], kind: str = "taylor", chunk: int | None = None
) -> dict[str, Tensor]:
    """Per gated layer, the importance ``I_u`` (float64, ``(units,)``) of ``kind`` (module docstring).

    ``dmodel``: a :class:`~prunelab.pruning.bayes.dllp.DLLPModel` (its gates, its sites); ``batches``: ``(x, y)``
    pairs (moved to the model's device). ``chunk``: gate sets per batched forward for ``ablation`` (default:
    ``max(1, 8192 // B)``). The model's train/eval mode is restored.
    """
    if kind not in FUNCTION_IMPORTANCES:
        raise ValueError(f"function importance must be one of {FUNCTION_IMPORTANCES}, got {kind!r}")
    if kind == "ablation" and any(s.granularity != "unit" for s in dmodel.sites):
        raise ValueError("importance='ablation' needs unit granularity (one forward per gated unit)")
    p0 = next(dmodel.model.parameters())
    dev, dtype = p0.device, p0.dtype
    acc = {s.name: torch.zeros(s.units, dtype=torch.float64, device=dev) for s in dmodel.sites}
    was_training = dmodel.training
    dmodel.eval()
    nb = 0
    try:
        for x, y in batches:
            x, y = x.to(dev), y.to(dev)
            if kind == "taylor":
                _taylor(dmodel, x, y, acc, dev, dtype)
            else:
                _ablation(dmodel, x, y, acc, dev, dtype, chunk or max(1, 8192 // max(1, x.shape[0])))
            nb += 1
    finally:
        dmodel.train(was_training)
    if nb == 0:
        raise ValueError(f"importance={kind!r} needs at least one training batch")
    out = {n: a / nb for n, a in acc.items()}
    if kind == "taylor":
        out = {n: a.sqrt() for n, a in out.items()}
    return {n: a.cpu() for n, a in out.items()}


def _taylor(dmodel, x: Tensor, y: Tensor, acc: Mapping[str, Tensor], dev, dtype) -> None:
    with torch.enable_grad():
        gates = {n: g.requires_grad_(True) for n, g in _ones(dmodel, 1, dev, dtype).items()}
        loss = F.cross_entropy(dmodel.forward_gates(x, gates)[0], y)
        grads = torch.autograd.grad(loss, list(gates.values()), allow_unused=True)
    for n, g in zip(gates, grads):
        if g is not None:
            acc[n] += g.detach()[0].double().pow(2)          # (g dE/dg)^2 at g = 1


@torch.no_grad()
def _ablation(dmodel, x: Tensor, y: Tensor, acc: Mapping[str, Tensor], dev, dtype, chunk: int) -> None:
    base = F.cross_entropy(dmodel.forward_gates(x, _ones(dmodel, 1, dev, dtype))[0].double(), y)
    for site in dmodel.sites:
        for start in range(0, site.units, chunk):
            idx = torch.arange(start, min(start + chunk, site.units), device=dev)
            gates = _ones(dmodel, idx.numel(), dev, dtype)
            gates[site.name][torch.arange(idx.numel(), device=dev), idx] = 0.0   # one unit off per gate set
            logits = dmodel.forward_gates(x, gates).double()                     # (P, B, C)
            p, b, c = logits.shape
            ce = F.cross_entropy(logits.reshape(p * b, c), y.repeat(p), reduction="none").view(p, b).mean(1)
            acc[site.name][idx] += ce - base
