"""Unit importance criteria (Molchanov, Mallya, Tyree, Frosio, Kautz, "Importance Estimation for Neural
Network Pruning", CVPR 2019) and the oracle they are judged against.

Notation: ``E`` the loss on the batches, unit ``m`` with gate ``z_m = 1`` (see :mod:`.gates`),
``g_m = dE/dz_m``. The importance of a unit is the squared change in loss when it is removed (Eq. 1)::

    I_m = (E(D, W) - E(D, W | z_m = 0))^2

Criteria (classes with one interface, :class:`Criterion`, registered by their config name in :data:`CRITERIA`):

- ``taylor_fo``: first-order Taylor expansion in the gate, ``I^(1)_m = (z_m g_m)^2`` (Eqs. 3 and 7). Through
  the chain rule ``z dE/dz = sum_s w_s dE/dw_s`` over every parameter ``s`` that only scales the unit's
  output: for a conv / linear without BN that is the filter's weights plus its bias (``b dE/db``), for a
  gate after BN ``gamma dE/dgamma + beta dE/dbeta``; for a coupled group it is summed over every gated
  member (Eq. 6, the filter-level ``(sum_s g_s w_s)^2``).
- ``taylor_fo_weight``: the paper's "weight" variant ``sum_s (g_s w_s)^2`` over the filter's parameters (Eq.
  3 summed over the filter): weight rows and biases of the conv / linear producers of the unit (summed over
  the group's members; BN parameters are not included).
- ``taylor_so``: second-order expansion of ``E(z_m = 0) - E(z_m = 1)`` in the gate:
  ``Delta E ~= -z g + 1/2 z^2 H_mm`` with ``H_mm = d^2E/dz_m^2``, scored ``(-z g + 1/2 z^2 H_mm)^2``. This is
  the exact second-order Taylor polynomial for moving ONE coordinate from ``z`` to 0 (the cross terms
  ``H_mk`` vanish because only ``z_m`` moves); the paper's Eq. 4 writes ``1/2 w_m H_m W`` with the full
  Hessian row, which is not the single-unit expansion -- we use the diagonal. ``H_mm`` is exact (one
  Hessian-vector product per unit with a one-hot vector, batched with ``is_grads_batched`` / vmap) or
  Hutchinson's estimate ``E_v[v * Hv]`` with Rademacher ``v`` (``hessian="hutchinson"``, ``samples``).
- baselines: ``l2_norm`` (L2 norm of the unit's incoming weights, i.e. the producers' weight rows, summed
  over the group's conv / linear producers), ``bn_scale`` (``|gamma|`` summed over the group's BN layers,
  Liu et al. 2017 "network slimming"), ``random``.
- ``oracle``: the true change in loss ``Delta E_m = E(z_m = 0) - E(full)`` on the same batches (the gate of
  the unit alone set to 0, every other unit present). It is scored ``(Delta E_m)^2`` as in Eq. 1; the
  ranking by ``(Delta E)^2`` is the ranking by ``|Delta E|`` (monotone transform) -- the paper's oracle is
  the absolute/squared change, not the signed change. The signed change is kept in ``oracle_delta``.

Per-minibatch scores are averaged over a pruning interval, then combined across pruning steps by an
exponential moving average (:class:`ScoreAccumulator`); pruned units keep score 0.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from prunelab.pruning.units.gates import Gates
from prunelab.pruning.units.groups import BN_TYPES, UNIT_TYPES, ChannelGroup, GroupMember, unit_index

logger = logging.getLogger(__name__)

Scores = dict[str, torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

NORMALIZATIONS = ("none", "l2", "mean")


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------
def _per_unit(group: ChannelGroup, member: GroupMember, per_channel: torch.Tensor) -> torch.Tensor:
    """Sum a per-channel statistic of ``member`` into the group's units (``index_add`` over ``root_idxs``)."""
    idxs, roots = unit_index(member)
    out = torch.zeros(group.num_units, dtype=per_channel.dtype, device=per_channel.device)
    return out.index_add_(0, roots.to(out.device), per_channel[idxs.to(out.device)])


def _row_reduce(t: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Reduce everything but dim 0 (a filter / neuron row) with ``fn`` applied to the flattened rows."""
    return fn(t.reshape(t.shape[0], -1))


def _producer_modules(model: nn.Module, group: ChannelGroup, types: tuple[type[nn.Module], ...]):
    for mem in group.producers():
        module = model.get_submodule(mem.name)
        if isinstance(module, types):
            yield mem, module


# ---------------------------------------------------------------------------------------------------------
# gradient criteria (one minibatch)
# ---------------------------------------------------------------------------------------------------------
def taylor_fo(gates: Gates) -> Scores:
    """``(z * dE/dz)^2`` per unit from the gate gradients of the last backward pass (Eq. 3 / 7)."""
    out: Scores = {}
    for gid, z in gates.z.items():
        g = z.grad if z.grad is not None else torch.zeros_like(z)
        out[gid] = (z.detach() * g.detach()).pow(2) * gates.mask[gid]
    return out


def taylor_fo_signed(gates: Gates) -> Scores:
    """``z * dE/dz`` (no square): the first-order estimate of ``-(E(z=0) - E(z=1))``. Not a criterion (a
    ranking by it prunes the units whose removal *increases* the loss most); used to test the square."""
    return {gid: (z.detach() * z.grad.detach()) * gates.mask[gid] for gid, z in gates.z.items()}


def taylor_fo_weight(model: nn.Module, groups: Sequence[ChannelGroup]) -> Scores:
    """``sum_s (w_s dE/dw_s)^2`` over the weight rows and biases of the group's conv / linear producers."""
    out: Scores = {}
    for g in groups:
        total = None
        for mem, module in _producer_modules(model, g, UNIT_TYPES):
            for p in (module.weight, getattr(module, "bias", None)):
                if p is None:
                    continue
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                per_ch = _row_reduce((p.detach() * grad.detach()).pow(2), lambda r: r.sum(1))
                s = _per_unit(g, mem, per_ch)
                total = s if total is None else total + s
        out[g.id] = total if total is not None else torch.zeros(g.num_units)
    return out


def l2_norm(model: nn.Module, groups: Sequence[ChannelGroup]) -> Scores:
    """L2 norm of each unit's incoming weights (producer weight rows), summed over the group's producers."""
    out: Scores = {}
    for g in groups:
        total = torch.zeros(g.num_units)
        for mem, module in _producer_modules(model, g, UNIT_TYPES):
            per_ch = _row_reduce(module.weight.detach(), lambda r: r.norm(dim=1))
            total = total.to(per_ch.device) + _per_unit(g, mem, per_ch)
        out[g.id] = total
    return out


def bn_scale(model: nn.Module, groups: Sequence[ChannelGroup]) -> Scores:
    """``|gamma|`` of the BatchNorm channels of each unit, summed over the group's BN layers."""
    missing = [g.id for g in groups if not any(True for _ in _producer_modules(model, g, BN_TYPES))]
    if missing:
        raise ValueError(f"criterion bn_scale needs a BatchNorm in every group; groups without one: {missing}")
    out: Scores = {}
    for g in groups:
        total = None
        for mem, module in _producer_modules(model, g, BN_TYPES):
            if module.weight is None:
                raise ValueError(f"criterion bn_scale: BatchNorm {mem.name} has no affine weight")
            s = _per_unit(g, mem, module.weight.detach().abs())
            total = s if total is None else total + s
        out[g.id] = total
    return out


def random_scores(groups: Sequence[ChannelGroup], generator: torch.Generator | None = None) -> Scores:
    return {g.id: torch.rand(g.num_units, generator=generator) for g in groups}


# ---------------------------------------------------------------------------------------------------------
# second order
# ---------------------------------------------------------------------------------------------------------
def gate_hessian_diag(
    loss: torch.Tensor,
    gates: Gates,
    mode: str = "exact",
    samples: int = 1,
    chunk: int = 256,
    generator: torch.Generator | None = None,
) -> tuple[Scores, Scores]:
    """Gradient ``g`` and diagonal Hessian ``H_mm`` of ``loss`` w.r.t. every gate.

    ``exact``: ``H_mm = (H e_m)_m`` with one-hot ``e_m`` -- the rows of ``d g_G / d z_G`` for each group,
    computed in chunks of ``chunk`` batched Hessian-vector products (``is_grads_batched``, i.e. vmap over
    the one-hot vectors); exact, costs one double-backward per unit (vectorised). ``hutchinson``:
    ``H_mm ~= mean_v v_m (H v)_m`` over ``samples`` Rademacher vectors ``v`` spanning all gates (unbiased).
    """
    gids = list(gates.z)
    zs = [gates.z[g] for g in gids]
    grads = torch.autograd.grad(loss, zs, create_graph=True, allow_unused=True)
    grads = [gr if gr is not None else torch.zeros_like(z) for gr, z in zip(grads, zs)]
    g_out = {gid: gr.detach() for gid, gr in zip(gids, grads)}
    h_out: Scores = {}
    if mode == "exact":
        for gid, gr, z in zip(gids, grads, zs):
            if not gr.requires_grad:
                h_out[gid] = torch.zeros_like(z).detach()
                continue
            n = z.numel()
            diag = torch.empty(n, device=z.device)
            for start in range(0, n, chunk):
                stop = min(n, start + chunk)
                eye = torch.zeros(stop - start, n, device=z.device)
                eye[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
                (rows,) = torch.autograd.grad(gr, z, grad_outputs=eye, retain_graph=True, is_grads_batched=True)
                diag[start:stop] = rows[torch.arange(stop - start), torch.arange(start, stop)]
            h_out[gid] = diag.detach()
    elif mode == "hutchinson":
        if samples < 1:
            raise ValueError("hessian samples must be >= 1")
        acc = [torch.zeros_like(z).detach() for z in zs]
        live = [i for i, gr in enumerate(grads) if gr.requires_grad]
        for _ in range(samples):
            vs = [torch.randint(0, 2, z.shape, generator=generator).to(z) * 2 - 1 for z in zs]
            hv = torch.autograd.grad(
                [grads[i] for i in live], [zs[i] for i in live], grad_outputs=[vs[i] for i in live],
                retain_graph=True, allow_unused=True,
            )
            for i, h in zip(live, hv):
                if h is not None:
                    acc[i] += vs[i] * h.detach()
        h_out = {gid: a / samples for gid, a in zip(gids, acc)}
    else:
        raise ValueError(f"hessian must be 'exact' or 'hutchinson', got {mode!r}")
    return g_out, h_out


def taylor_so_from(z: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``(-z g + 1/2 z^2 H_zz)^2``: the squared second-order estimate of ``E(z -> 0) - E(z)``."""
    return (-z * g + 0.5 * z.pow(2) * h).pow(2)


def taylor_so(loss: torch.Tensor, gates: Gates, mode: str = "exact", samples: int = 1) -> Scores:
    g, h = gate_hessian_diag(loss, gates, mode=mode, samples=samples)
    return {gid: taylor_so_from(gates.effective(gid).detach(), g[gid], h[gid]) for gid in g}


# ---------------------------------------------------------------------------------------------------------
# oracle
# ---------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def frozen_state(model: nn.Module, seed: int = 0) -> Iterator[Callable[[int], contextlib.AbstractContextManager]]:
    """Restore buffers (BatchNorm running statistics) on exit; yields ``rng(i)``, a context making the
    ``i``-th forward draw the same random numbers (dropout) every time."""
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}

    @contextlib.contextmanager
    def rng(i: int) -> Iterator[None]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + i)
            yield

    try:
        yield rng
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in buffers:
                    b.copy_(buffers[n])


def oracle_delta(
    model: nn.Module,
    gates: Gates,
    batches: Sequence[Batch],
    loss_fn: LossFn,
    only: Iterable[str] | None = None,
) -> Scores:
    """Signed ``Delta E_m = E(unit m removed) - E(full)``, the loss averaged over ``batches`` (each unit
    removed alone; already-masked units stay removed and get 0). BN statistics and RNG are restored so every
    forward sees the same model and the same dropout masks. ``only``: restrict to these group ids (the
    oracle costs one forward pass per unit and batch)."""
    wanted = set(gates.z) if only is None else set(only)

    def loss_all(rng) -> float:
        total = 0.0
        for i, (x, y) in enumerate(batches):
            with rng(i):
                total += float(loss_fn(model(x), y))
        return total / len(batches)

    out: Scores = {}
    with torch.no_grad(), frozen_state(model) as rng:
        base = loss_all(rng)
        for gid, z in gates.z.items():
            if gid not in wanted:
                continue
            delta = torch.zeros(z.numel())
            for u in range(z.numel()):
                if not bool(gates.mask[gid][u]):
                    continue
                with gates.ablated(gid, u):
                    delta[u] = loss_all(rng) - base
            out[gid] = delta
    return out


def oracle(
    model: nn.Module,
    gates: Gates,
    batches: Sequence[Batch],
    loss_fn: LossFn,
    only: Iterable[str] | None = None,
) -> Scores:
    """``(Delta E_m)^2`` (Eq. 1): the reference ranking the criteria are judged against."""
    return {gid: d.pow(2) for gid, d in oracle_delta(model, gates, batches, loss_fn, only).items()}


# ---------------------------------------------------------------------------------------------------------
# accumulation
# ---------------------------------------------------------------------------------------------------------
def normalize_scores(scores: Scores, masks: dict[str, torch.Tensor], how: str | None) -> Scores:
    """Per-group (per-layer) normalisation over the kept units: ``l2`` divides by the L2 norm of the
    group's scores, ``mean`` by their mean; ``none`` / None leaves them. Pruned units stay 0."""
    how = "none" if how is None else how
    if how not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {how!r}")
    out: Scores = {}
    for gid, s in scores.items():
        keep = masks[gid].to(s.device)
        s = s * keep
        if how == "l2":
            s = s / s.norm().clamp_min(1e-30)
        elif how == "mean":
            n = keep.sum().clamp_min(1)
            s = s / (s.sum() / n).clamp_min(1e-30)
        out[gid] = s
    return out


class ScoreAccumulator:
    """Averages per-minibatch scores over a pruning interval and keeps an EMA across intervals.

    ``add(scores)`` after each minibatch; ``update()`` at a pruning step: ``ema <- m * ema + (1 - m) * mean``
    (``ema <- mean`` the first time), resets the interval and returns the EMA.
    """

    def __init__(self, momentum: float = 0.9):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"ema momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self._sum: Scores = {}
        self.count = 0
        self.ema: Scores | None = None

    def add(self, scores: Scores) -> None:
        for gid, s in scores.items():
            s = s.detach().float().cpu()
            self._sum[gid] = self._sum[gid] + s if gid in self._sum else s.clone()
        self.count += 1

    def interval_mean(self) -> Scores:
        if self.count == 0:
            raise RuntimeError("no scores accumulated in this interval")
        return {gid: s / self.count for gid, s in self._sum.items()}

    def update(self) -> Scores:
        mean = self.interval_mean()
        if self.ema is None:
            self.ema = mean
        else:
            m = self.momentum
            self.ema = {gid: m * self.ema[gid] + (1 - m) * mean[gid] for gid in mean}
        self._sum, self.count = {}, 0
        return self.ema

    def reset(self) -> None:
        self._sum, self.count, self.ema = {}, 0, None

    def map_interval(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace every interval sum ``s`` by ``fn(s)`` (e.g. the mean over DDP ranks before a pruning step)."""
        self._sum = {gid: fn(s) for gid, s in self._sum.items()}

    def state_dict(self) -> dict:
        return {"sum": self._sum, "count": self.count, "ema": self.ema}

    def load_state_dict(self, state: dict) -> None:
        self._sum, self.count, self.ema = dict(state["sum"]), int(state["count"]), state["ema"]


# ---------------------------------------------------------------------------------------------------------
# criteria as classes (one interface, as Torch-Pruning's ``Importance``)
# ---------------------------------------------------------------------------------------------------------
class Criterion:
    """A unit importance criterion: scores per unit of every group (higher = more important = kept).

    ``kind`` says when it reads: ``gradient`` -- from the gradients of the training loop's backward pass
    (:meth:`from_gradients`); ``passes`` -- from its own forward/backward passes on a batch (:meth:`batch`);
    ``static`` -- from the weights alone (:meth:`static`). :meth:`batch` works for every data criterion (a
    gradient criterion does one forward/backward and reads its gradients). Adding a criterion: one subclass
    registered in :data:`CRITERIA` plus one YAML in ``conf/method/``."""

    name = "base"
    kind = "gradient"

    @property
    def needs_data(self) -> bool:
        return self.kind != "static"

    def from_gradients(self, model: nn.Module, gates: Gates, groups: Sequence[ChannelGroup]) -> Scores:
        raise RuntimeError(f"criterion {self.name} needs its own passes: use accumulate_batch(x, y)")

    def batch(self, model: nn.Module, gates: Gates, groups: Sequence[ChannelGroup], batch: Batch, loss_fn: LossFn,
              hessian: str = "exact", samples: int = 1) -> Scores:
        """Scores of one minibatch (does its own forward/backward)."""
        if self.kind == "static":
            raise ValueError(f"criterion {self.name!r} needs no data; use static_scores")
        x, y = batch
        gates.zero_grad()
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        return self.from_gradients(model, gates, groups)

    def static(self, model: nn.Module, groups: Sequence[ChannelGroup],
               generator: torch.Generator | None = None) -> Scores:
        raise ValueError(f"criterion {self.name!r} is not data-free")


class TaylorFO(Criterion):
    name = "taylor_fo"

    def from_gradients(self, model, gates, groups):
        return taylor_fo(gates)


class TaylorFOWeight(Criterion):
    name = "taylor_fo_weight"

    def from_gradients(self, model, gates, groups):
        return taylor_fo_weight(model, groups)


class TaylorSO(Criterion):
    name = "taylor_so"
    kind = "passes"

    def batch(self, model, gates, groups, batch, loss_fn, hessian="exact", samples=1):
        x, y = batch
        gates.zero_grad()
        model.zero_grad(set_to_none=True)
        return taylor_so(loss_fn(model(x), y), gates, mode=hessian, samples=samples)


class Oracle(Criterion):
    name = "oracle"
    kind = "passes"

    def batch(self, model, gates, groups, batch, loss_fn, hessian="exact", samples=1):
        return oracle(model, gates, [batch], loss_fn)


class L2Norm(Criterion):
    name = "l2_norm"
    kind = "static"

    def static(self, model, groups, generator=None):
        return l2_norm(model, groups)


class BNScale(Criterion):
    name = "bn_scale"
    kind = "static"

    def static(self, model, groups, generator=None):
        return bn_scale(model, groups)


class Random(Criterion):
    name = "random"
    kind = "static"

    def static(self, model, groups, generator=None):
        return random_scores(groups, generator)


#: config name (``method.criterion``) -> criterion
CRITERIA: dict[str, Criterion] = {c.name: c for c in (TaylorFO(), TaylorFOWeight(), TaylorSO(), L2Norm(), BNScale(),
                                                        Random(), Oracle())}


def get_criterion(name: str) -> Criterion:
    """The criterion of a config name, or a ValueError naming the allowed values."""
    if name not in CRITERIA:
        raise ValueError(f"unknown structured criterion {name!r}; allowed values: {', '.join(CRITERIA)}")
    return CRITERIA[name]


def check_criterion(name: str) -> str:
    return get_criterion(name).name


def batch_scores(criterion: str, model: nn.Module, gates: Gates, groups: Sequence[ChannelGroup], batch: Batch,
                 loss_fn: LossFn, hessian: str = "exact", samples: int = 1) -> Scores:
    """Scores of one minibatch for a gradient criterion or the oracle (does its own forward/backward)."""
    return get_criterion(criterion).batch(model, gates, groups, batch, loss_fn, hessian, samples)


def static_scores(criterion: str, model: nn.Module, groups: Sequence[ChannelGroup],
                  generator: torch.Generator | None = None) -> Scores:
    """Data-free criteria: ``l2_norm``, ``bn_scale``, ``random``."""
    return get_criterion(criterion).static(model, groups, generator)


def all_criteria_scores(
    model: nn.Module,
    gates: Gates,
    groups: Sequence[ChannelGroup],
    batches: Iterable[Batch],
    loss_fn: LossFn,
    criteria: Sequence[str] = tuple(CRITERIA),
    hessian: str = "exact",
    samples: int = 1,
    seed: int = 0,
    oracle_groups: Iterable[str] | None = None,
) -> dict[str, Scores]:
    """Every criterion's scores averaged over ``batches`` (same batches for all, incl. the oracle):
    ``{criterion: {group_id: scores}}``. BN statistics are restored after each criterion; ``oracle_groups``
    restricts the (costly) oracle to some groups."""
    batches = list(batches)
    gen = torch.Generator().manual_seed(seed)
    result: dict[str, Scores] = {}
    for c in criteria:
        crit = get_criterion(c)
        if crit.kind == "static":
            if c == "bn_scale" and not all(g.has_norm() for g in groups):
                logger.info("skipping bn_scale: some groups have no BatchNorm")
                continue
            result[c] = crit.static(model, groups, gen)
            continue
        if c == "oracle":
            result[c] = oracle(model, gates, batches, loss_fn, oracle_groups)
            continue
        acc = ScoreAccumulator()
        with frozen_state(model, seed) as rng:
            for i, b in enumerate(batches):
                with rng(i):
                    acc.add(crit.batch(model, gates, groups, b, loss_fn, hessian, samples))
        result[c] = acc.interval_mean()
    gates.zero_grad()
    model.zero_grad(set_to_none=True)
    return result
