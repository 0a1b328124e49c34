"""Start-up checks of a run's options: everything a run reads is checked before any training, and a bad value
is refused with a :class:`~prunelab.errors.UserError` that names the option and what is allowed.

- top-level keys the schema (``prunelab.config.PrunelabConfig``) does not know, added with ``+``;
- the options of every ``_target_`` group (``data``, ``method``, ``trainer``, ...) against the target's
  signature: unknown names, and values of the wrong type (``data.augment=maybe``, ``finetune.epochs=abc``);
- value ranges (``RULES``: batch sizes, epochs, learning rates, gradient clipping, score batches, ...);
- after the model is built (a cheap instance, before any training): ``prune.include`` / ``prune.exclude``
  must select weights of this model, every exclude pattern must match one.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from prunelab.config import PrunelabConfig
from prunelab.errors import UserError

# -- unknown keys -------------------------------------------------------------------------------------------


def check_known_keys(cfg: DictConfig, schema: type = PrunelabConfig, prefix: str = "") -> None:
    """Keys under the typed part of the config that its dataclass does not declare (``+foo=1``,
    ``+prune.foo=1``): Hydra lets ``+`` add them, but they would only enter the run's hash and do nothing."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in cfg:
        if key == "hydra" and not prefix:
            continue
        name = f"{prefix}{key}"
        if key not in fields:
            raise UserError(f"{name} is not a prunelab option (misspelt?); the options of "
                            f"{prefix.rstrip('.') or 'the top level'} are: {', '.join(fields)}")
        ftype = fields[key].type
        ftype = typing.get_type_hints(schema).get(key, ftype)
        if dataclasses.is_dataclass(ftype) and OmegaConf.is_dict(cfg._get_node(key)):
            check_known_keys(cfg[key], ftype, f"{name}.")


# -- types of _target_ options ------------------------------------------------------------------------------
_NONE = type(None)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number (not nan)"
    if tp is str:
        return "a string"
    if origin in (list, tuple, Sequence, typing.Sequence) or tp in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return "a list" + (f" of items each {_type_name(args[0])}" if len(args) == 1 else "")
    if origin in (dict, Mapping, typing.Mapping) or tp is dict:
        return "a mapping"
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not _NONE]
        text = " or ".join(_type_name(a) for a in args)
        return text + (" or null" if _NONE in typing.get_args(tp) else "")
    return getattr(tp, "__name__", str(tp))


def _matches(value: Any, tp: Any) -> bool:
    """Whether a (resolved, plain) config value fits the annotation ``tp``; unknown annotations fit."""
    if tp is Any or tp is inspect.Parameter.empty or isinstance(tp, typing.TypeVar):
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if tp is _NONE or tp is None:
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer())
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and not (
            isinstance(value, float) and math.isnan(value))
    if tp is str:
        return isinstance(value, str)
    if origin in (list, tuple, Sequence, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return len(args) != 1 or all(_matches(v, args[0]) for v in value)
    if origin in (dict, Mapping, typing.Mapping) or tp is dict:
        return isinstance(value, dict)
    return True  # classes (Accelerator, Strategy, ...), callables: not checked here


def _type_hints(fn: Callable) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # an annotation naming something imported only for type checkers: skip the types
        return {}


def _signature_hints(fn: Callable) -> tuple[inspect.Signature, dict[str, Any]]:
    """The options ``fn`` takes and their annotations. A class whose constructor passes ``**kwargs`` on to its
    base class takes the base constructor's options too: the chain is followed up to a constructor without
    ``**kwargs`` (the signature stays open only when none closes it)."""
    if not inspect.isclass(fn):
        return inspect.signature(fn), _type_hints(fn)
    params: dict[str, inspect.Parameter] = {}
    hints: dict[str, Any] = {}
    open_kwargs = True
    for klass in fn.__mro__:
        if klass is object:  # no constructor of the chain closed it: object() takes no options
            open_kwargs = False
            break
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        sig = inspect.signature(init)
        own_hints = _type_hints(init)
        for name, p in sig.parameters.items():
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and name not in params:
                params[name] = p.replace(kind=p.KEYWORD_ONLY)
                if name in own_hints:
                    hints[name] = own_hints[name]
        if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
            open_kwargs = False
            break
    merged = list(params.values())
    if open_kwargs:
        merged.append(inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD))
    return inspect.Signature(merged), hints


def choice_name(group: str, node: DictConfig) -> str:
    """``method=magnitude`` (the option chosen on the command line or by default) or the target's path."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get(group)
        if choice:
            return f"{group}={choice}"
    return str(node.get("_target_", group))


def check_target_options(group: str, node: DictConfig, fn: Callable, *, keys: Sequence[str] | None = None,
                         also_allowed: Sequence[str] = (), hidden: Sequence[str] = ()) -> None:
    """Every option of ``group`` (or only ``keys``) is a parameter of ``fn`` (unless it takes ``**kwargs``)
    and its value fits the parameter's annotation. ``also_allowed``: options another callable takes (listed
    as allowed); ``hidden``: parameters the pipeline passes itself (not options)."""
    sig, hints = _signature_hints(fn)
    params = {n: p for n, p in sig.parameters.items()
              if n != "self" and n not in hidden and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    open_kwargs = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    for key in (list(node) if keys is None else keys):
        if str(key).startswith("_"):
            continue
        if key not in params:
            if open_kwargs:
                continue
            names = list(also_allowed) + list(params)
            allowed = ", ".join(names) if names else "none: it takes no options"
            raise UserError(f"{group}.{key} is not an option of {choice_name(group, node)} "
                            f"({node['_target_']}); allowed options: {allowed}")
        tp = hints.get(key, params[key].annotation)
        try:
            value = node[key]
        except MissingMandatoryValue:
            raise UserError(f"{group}.{key} must be set ({choice_name(group, node)} has no default for it): "
                            f"add {group}.{key}=...") from None
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        if not _matches(value, tp):
            raise UserError(f"{group}.{key}={value!r}: must be {_type_name(tp)}")


# -- value ranges -------------------------------------------------------------------------------------------
def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int_at_least(lo: int, null: bool = False) -> tuple[Callable[[Any], bool], str]:
    ok = lambda v: (null and v is None) or (_num(v) and float(v).is_integer() and v >= lo)  # noqa: E731
    return ok, f"an integer >= {lo}" + (" or null" if null else "")


def _finite(lo: float, strict: bool = False, null: bool = False, hi: float | None = None,
            hi_strict: bool = True) -> tuple[Callable[[Any], bool], str]:
    def ok(v):
        if v is None:
            return null
        if not (_num(v) and math.isfinite(v)):
            return False
        if (v <= lo) if strict else (v < lo):
            return False
        return hi is None or ((v < hi) if hi_strict else (v <= hi))

    text = f"a finite number {'>' if strict else '>='} {lo}"
    if hi is not None:
        text += f" and {'<' if hi_strict else '<='} {hi}"
    return ok, text + (" or null" if null else "")


def _each(check: tuple[Callable[[Any], bool], str]) -> tuple[Callable[[Any], bool], str]:
    ok, text = check
    return (lambda v: isinstance(v, (list, tuple)) and all(ok(x) for x in v)), f"a list of {text}s"


_OPTIMIZER = {
    "lr": _finite(0.0),
    "momentum": _finite(0.0, hi=1.0),
    "weight_decay": _finite(0.0),
    "betas": _each(_finite(0.0, hi=1.0)),
    "clip_grad_norm": _finite(0.0, strict=True, null=True),
}
_SCHEDULER = {"gamma": _finite(0.0, strict=True), "milestones": _each(_finite(0.0, hi=1.0, hi_strict=False)),
              "warmup_epochs": _int_at_least(0)}

# option -> (check, what is allowed); options absent from the config (another data module, schedule, ...)
# are skipped. Options whose class checks them in its constructor (schedule.rounds, finetune.epochs, ...) are
# not repeated here: the constructors run at start-up too (``run.check_options``).
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (lambda v: _num(v) and float(v).is_integer() and 0 <= v < 2**32, "an integer in [0, 2**32)"),
    "pretrain.epochs": _int_at_least(0),
    "prune.score_batches": _int_at_least(1),
    "prune.score_batch_size": _int_at_least(1, null=True),
    "data.batch_size": _int_at_least(1),
    "data.eval_batch_size": _int_at_least(1),
    "data.num_workers": _int_at_least(0),
    "data.steps_per_call": _int_at_least(1),
    "data.val_fraction": _finite(0.0, hi=1.0),
    "data.test_fraction": _finite(0.0, strict=True, hi=1.0),
    "schedule.round_epochs": _int_at_least(0, null=True),
    "measure.warmup": _int_at_least(0),
    "measure.repeats": _int_at_least(1),
    "measure.threads": _int_at_least(1, null=True),
    "measure.batch_sizes": _each(_int_at_least(1)),
    **{f"{recipe}.optimizer.{k}": v for recipe in ("pretrain", "finetune") for k, v in _OPTIMIZER.items()},
    **{f"{recipe}.scheduler.{k}": v for recipe in ("pretrain", "finetune") for k, v in _SCHEDULER.items()},
}


def check_ranges(cfg: DictConfig) -> None:
    for option, (ok, allowed) in RULES.items():
        try:
            value = OmegaConf.select(cfg, option, throw_on_missing=True)
        except MissingMandatoryValue:
            raise UserError(f"{option} must be set (it has no default): add {option}=...") from None
        if value is None and OmegaConf.select(cfg, option, default="__absent__") == "__absent__":
            continue
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        if not ok(value):
            raise UserError(f"{option}={value!r}: must be {allowed}")


def check_include_kinds(cfg: DictConfig) -> None:
    from prunelab.pruning.masks import PRUNABLE_TYPES

    include = list(cfg.prune.include)
    unknown = [k for k in include if k not in PRUNABLE_TYPES]
    if unknown or not include:
        raise UserError(f"prune.include={include}: unknown layer kind(s) {unknown}; allowed values: "
                        f"{', '.join(sorted(PRUNABLE_TYPES))}" if unknown else
                        f"prune.include is empty; allowed values: {', '.join(sorted(PRUNABLE_TYPES))}")


# -- against the model --------------------------------------------------------------------------------------
def check_prunable(cfg: DictConfig, model, model_name: str) -> None:
    """``prune.include`` / ``prune.exclude*`` select at least one weight of ``model``, and each exclude
    pattern matches a weight that include selects (a pattern matching nothing is a typo)."""
    from prunelab.pruning.masks import prunable_parameters

    p = cfg.prune
    kinds = list(p.include)
    try:
        selected = prunable_parameters(model, include=kinds)
    except ValueError:
        selected = []
    if not selected:
        raise UserError(f"prune.include={kinds} selects no layer of {model_name} (its layers: "
                        f"{', '.join(sorted({type(m).__name__ for m in model.modules()} - {type(model).__name__}))})")
    for pattern in p.exclude:
        if not any(fnmatch.fnmatch(n, pattern) for n in selected):
            raise UserError(f"prune.exclude pattern {pattern!r} matches no prunable weight of {model_name}; "
                            f"its prunable weights: {', '.join(selected)}")
    try:
        prunable_parameters(model, include=kinds, exclude_first=bool(p.exclude_first),
                            exclude_last=bool(p.exclude_last), exclude=list(p.exclude))
    except ValueError:
        raise UserError(f"prune.include={kinds}, prune.exclude_first={p.exclude_first}, prune.exclude_last="
                        f"{p.exclude_last}, prune.exclude={list(p.exclude)} leave no weight of {model_name} to "
                        f"prune; its prunable weights: {', '.join(selected)}") from None
