"""SNIP: single-shot network pruning based on connection sensitivity (Lee, Ajanthan & Torr, ICLR 2019).

Connection sensitivity (SNIP, Eq. 6): with a multiplicative mask c on every weight,
``g_j = dL(c ⊙ w)/dc_j |_{c=1} = (dL/dw_j) w_j`` and the score is ``s_j = |g_j|`` (the paper normalises by
``sum_k |g_k|``, a positive constant that does not change the ranking, so it is omitted). Over
``num_batches`` batches the gradient is accumulated before the absolute value, as in the reference code
(``loss.backward()`` per batch, then ``|grad ⊙ w|``): ``s = |(sum_b dL_b/dw) ⊙ w|`` with ``L_b`` the mean
cross-entropy of batch b.

BatchNorm: the reference implementations score a freshly initialised network in training mode (batch
statistics; the GraSP code does the same on a copy of the network). ``train_mode=True`` (default) does this;
running statistics and every module's train/eval flag are saved and restored, so scoring leaves the model
exactly as it was. ``train_mode=False`` scores in eval mode (running statistics), as in Tanaka et al.'s
SynFlow code base. Gradients are taken with ``torch.autograd.grad``: ``.grad`` fields are untouched.

DDP: under an initialised multi-process group every rank accumulates the gradients of its shard of the
chosen batches and the sums are all-reduced before ``|. ⊙ w|`` (see :mod:`prunelab.pruning.scorers.sharding`),
so every rank gets the scores of one process scoring all of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from prunelab.pruning.masks import MaskSet
from prunelab.pruning.scorers.base import Batch, Scorer
from prunelab.pruning.scorers.sharding import all_reduce_sum_, score_group, shard


@contextlib.contextmanager
def scoring_state(model: nn.Module, params: Sequence[torch.Tensor], train_mode: bool) -> Iterator[None]:
    """Put ``model`` in train (``train_mode``) or eval mode with ``requires_grad`` on ``params``; restore every
    module's mode, every buffer (BatchNorm running statistics, ``num_batches_tracked``) and the
    ``requires_grad`` flags on exit."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    flags = [(p, p.requires_grad) for p in params]
    model.train(train_mode)
    for p in params:
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            yield
    finally:
        for m, t in modes:
            m.training = t
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for p, f in flags:
            p.requires_grad_(f)


def take_batches(batches: Sequence[Batch], num_batches: int, who: str) -> list[Batch]:
    """The first ``num_batches`` batches (all of them if fewer); raises if there are none."""
    if num_batches < 1:
        raise ValueError(f"method={who}: num_batches must be >= 1, got {num_batches}")
    chosen = list(batches)[:num_batches]
    if not chosen:
        raise ValueError(f"method={who} needs data: no batches were given to the scorer")
    return chosen


def loss_grads(
    model: nn.Module,
    params: Sequence[torch.Tensor],
    batch: Batch,
    temperature: float = 1.0,
    create_graph: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Gradients of the mean cross-entropy of ``model(x) / temperature`` on one batch w.r.t. ``params``
    (floating inputs are cast to the parameters' dtype and device)."""
    ref = next(iter(params))
    x, y = batch[0].to(ref.device), batch[1].to(ref.device)
    if x.is_floating_point():
        x = x.to(ref.dtype)
    loss = F.cross_entropy(model(x) / temperature, y)
    return torch.autograd.grad(loss, list(params), create_graph=create_graph, allow_unused=True)


def _zeros_if_none(g: torch.Tensor | None, p: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(p) if g is None else g


class SNIPScorer(Scorer):
    """score = |(sum over batches of dL/dw) ⊙ w| (SNIP, Lee et al. 2019, Eq. 6); under DDP the batch sum is
    sharded over the ranks and all-reduced."""
    name = "snip"

    needs_data = True

    def __init__(self, num_batches: int = 1, train_mode: bool = True):
        self.num_batches = int(num_batches)
        self.train_mode = bool(train_mode)

    def score(self, model: nn.Module, masks: MaskSet, batches: Sequence[Batch]) -> dict[str, torch.Tensor]:
        names = list(masks)
        params = [model.get_parameter(n) for n in names]
        acc = [torch.zeros_like(p) for p in params]
        chosen = take_batches(batches, self.num_batches, self.name)
        with scoring_state(model, params, self.train_mode):
            for batch in shard(chosen, *score_group()):
                for a, g, p in zip(acc, loss_grads(model, params, batch), params):
                    a += _zeros_if_none(g, p).detach()
        all_reduce_sum_(acc)
        return {n: (a * p.detach()).abs() for n, a, p in zip(names, acc, params)}
