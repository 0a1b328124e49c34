"""Schedules (the ``schedule`` config group): the order in which stages run.

- ``oneshot``: pretrain (cached) -> score the trained weights -> prune -> fine-tune.
- ``at_init``: score the initial weights -> prune -> train the sparse network from init (no pretraining;
  the training stage, recorded as ``finetune`` with ``recipe: pretrain``, uses the pretraining recipe by
  default: ``schedule.train_from``; a command-line override of the recipe it ignores earns a warning).
- ``iterative``: lottery-ticket style: N rounds of prune -> rewind -> retrain, the sparsity after round r
  being 1 - (1 - s)^(r/N) (geometric in density), weights rewound to init or to epoch k of pretraining.
- ``train_prune`` (presets ``iterative_structured``, ``bayesian``): a method that prunes *while training*
  (:class:`~prunelab.pruning.method.TrainingMethod`: iterative Taylor, BMRS, DLLP) trains for ``epochs``
  from the pretrained model (or from init), then the pruned network is compacted and fine-tuned.

Structured methods also run with ``oneshot`` (score -> remove units -> compact -> fine-tune). Every schedule
checks in :meth:`Schedule.check` that it can run the configured method, before anything is trained.
"""

from __future__ import annotations

import logging

from prunelab.pipeline.context import RunContext
from prunelab.pipeline.stages import method_prune_stage, pretrain, prune_stage, train_stage
from prunelab.pruning.density import round_sparsities
from prunelab.pruning.method import TrainingMethod, check_choice

log = logging.getLogger(__name__)


class Schedule:
    name = "base"

    def check(self, method) -> None:
        """Raise a ValueError naming the options when this schedule cannot run ``method``."""
        if isinstance(method, TrainingMethod):
            raise ValueError(f"schedule={self.name} cannot run method={method.name} (it prunes units during "
                             "training); allowed schedules: train_prune, iterative_structured, bayesian"
                             + (", oneshot" if method.supports_one_shot else ""))

    def run(self, ctx: RunContext):
        raise NotImplementedError

    def ignored_options(self) -> tuple[str, ...]:
        """Options (prefixes) this schedule never reads: set on the command line, they earn a warning."""
        return ()

    def warn_ignored(self, command_line: set[str]) -> list[str]:
        """Warn about the options given on the command line that this schedule ignores; returns them."""
        ignored = sorted(k for k in command_line for p in self.ignored_options() if k == p or k.startswith(p + "."))
        if ignored:
            log.warning("schedule=%s ignores %s: %s", self.name, ", ".join(ignored), self.ignored_reason())
        return ignored

    def ignored_reason(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({vars(self)})"


class OneShot(Schedule):
    name = "oneshot"

    def check(self, method) -> None:
        if not (isinstance(method, TrainingMethod) and method.supports_one_shot):
            super().check(method)

    def run(self, ctx: RunContext):
        model, _, _ = pretrain(ctx)
        teacher = ctx.clone(model).eval()
        ft = ctx.finetune
        if isinstance(ctx.scorer, TrainingMethod):  # structured: remove units, compact, fine-tune
            model, left = method_prune_stage(ctx, model)
            return _finetune_units(ctx, model, left, teacher)
        masks = prune_stage(ctx, model, ctx.new_masks(model), ctx.sparsity)
        return train_stage(ctx, model, masks, "finetune", ft.epochs, ft.optimizer, ft.scheduler, teacher)


class AtInit(Schedule):
    """Prune at initialisation (SNIP, GraSP, SynFlow, random...), then train the sparse network.

    ``train_from``: ``pretrain`` (default) trains the sparse network with the pretraining recipe
    (``pretrain.epochs``, optimiser, scheduler), as pruning-at-init papers do; ``finetune`` uses the
    fine-tuning recipe instead."""

    name = "at_init"

    def __init__(self, train_from: str = "pretrain"):
        check_choice("schedule.train_from", train_from, ("pretrain", "finetune"))
        self.train_from = train_from

    def ignored_options(self) -> tuple[str, ...]:
        # the strategy (finetune=overparam, ...) is used either way; only the recipe is not
        if self.train_from == "pretrain":
            return ("finetune.epochs", "finetune.optimizer", "finetune.scheduler")
        return ("pretrain",)

    def ignored_reason(self) -> str:
        if self.train_from == "pretrain":
            return ("it trains the sparse network with the pretraining recipe (pretrain.epochs, "
                    "pretrain.optimizer, pretrain.scheduler); set schedule.train_from=finetune to use finetune.*")
        return ("it trains the sparse network with the fine-tuning recipe and never pretrains; set "
                "schedule.train_from=pretrain to use pretrain.*")

    def run(self, ctx: RunContext):
        model = ctx.build_model()
        masks = prune_stage(ctx, model, ctx.new_masks(model), ctx.sparsity)
        recipe = ctx.cfg.pretrain if self.train_from == "pretrain" else None
        ft = ctx.finetune
        epochs = int(recipe.epochs) if recipe is not None else ft.epochs
        opt = recipe.optimizer if recipe is not None else ft.optimizer
        sched = recipe.scheduler if recipe is not None else ft.scheduler
        return train_stage(ctx, model, masks, "finetune", epochs, opt, sched, teacher=None,
                           recipe=self.train_from)


class Iterative(Schedule):
    """Iterative magnitude pruning with rewinding (Frankle & Carbin 2019; Frankle et al. 2020).

    Stage records: ``prune_round<r>`` (metrics ``prune/...``, field ``round``: r) and ``retrain_round<r>``
    (field ``round``) per round; ``prune`` is the last round's record, with the same keys as under
    ``oneshot``."""

    name = "iterative"

    def __init__(self, rounds: int = 3, rewind_epoch: int | None = 0, round_epochs: int | None = None):
        if int(rounds) < 1:
            raise ValueError(f"schedule.rounds must be >= 1, got {rounds}")
        if rewind_epoch is not None and int(rewind_epoch) < 0:
            raise ValueError(f"schedule.rewind_epoch must be null or >= 0, got {rewind_epoch}")
        self.rounds = int(rounds)
        self.rewind_epoch = None if rewind_epoch is None else int(rewind_epoch)
        self.round_epochs = round_epochs

    def round_sparsities(self, sparsity: float) -> list[float]:
        return round_sparsities(sparsity, self.rounds)

    def run(self, ctx: RunContext):
        if self.rewind_epoch is not None and self.rewind_epoch > int(ctx.cfg.pretrain.epochs):
            raise ValueError(f"schedule.rewind_epoch={self.rewind_epoch} exceeds pretrain.epochs")
        model, init_state, _ = pretrain(ctx, rewind_epoch=self.rewind_epoch or None)
        teacher = ctx.clone(model).eval()
        rewind_state = None
        if self.rewind_epoch == 0:
            rewind_state = init_state
        elif self.rewind_epoch:
            import torch

            rewind_state = torch.load(ctx.dense_dir() / f"rewind_epoch{self.rewind_epoch}.pt",
                                      map_location="cpu", weights_only=True)
        masks = ctx.new_masks(model)
        epochs = int(self.round_epochs if self.round_epochs is not None else ctx.cfg.pretrain.epochs)
        ft = ctx.finetune
        sparsities = self.round_sparsities(ctx.sparsity)
        for r, s in enumerate(sparsities, start=1):
            # metrics named prune/... as under every schedule; the record says which round it is
            masks = prune_stage(ctx, model, masks, s, round=r)
            if rewind_state is not None:
                model.load_state_dict(rewind_state)
                masks.apply(model)
            if r < self.rounds:
                model, masks = train_stage(ctx, model, masks, f"retrain_round{r}", epochs,
                                           ctx.cfg.pretrain.optimizer, ctx.cfg.pretrain.scheduler,
                                           use_strategy=False, recipe="pretrain")
                ctx.stages[f"retrain_round{r}"]["round"] = r
        # stages.prune: the last round's record (the pruned network that is fine-tuned), as under oneshot
        ctx.stages["prune"] = ctx.stages[f"prune_round{self.rounds}"]
        return train_stage(ctx, model, masks, "finetune", ft.epochs, ft.optimizer, ft.scheduler, teacher)


class TrainPrune(Schedule):
    """Prune while training, then compact and fine-tune.

    ``epochs``: length of the pruning stage (structured Taylor stops earlier once its target is reached);
    ``pretrained``: start from the cached dense model (Taylor, DLLP) or from init (BMRS trains the noise
    variables from scratch); ``recipe``: optimiser and LR schedule of the pruning stage, ``finetune`` or
    ``pretrain``; ``frequency`` / ``k``: iterative structured pruning removes ``k`` units every ``frequency``
    minibatches (other methods ignore them)."""

    name = "train_prune"

    def __init__(self, epochs: int = 10, pretrained: bool = True, recipe: str = "finetune",
                 frequency: int = 30, k: int = 100):
        if int(epochs) < 0:
            raise ValueError(f"schedule.epochs must be >= 0, got {epochs}")
        check_choice("schedule.recipe", recipe, ("pretrain", "finetune"))
        if int(frequency) < 1 or int(k) < 1:
            raise ValueError(f"schedule.frequency={frequency} and schedule.k={k} must be >= 1")
        self.epochs, self.pretrained, self.recipe = int(epochs), bool(pretrained), recipe
        self.frequency, self.k = int(frequency), int(k)

    def check(self, method) -> None:
        if not isinstance(method, TrainingMethod):
            raise ValueError(f"schedule={self.name} needs a method that prunes during training (taylor_fo, "
                             "taylor_fo_weight, taylor_so, l2_norm, bn_scale, random_structured, oracle, slimming, "
                             "bmrs_n, bmrs_u, snr, expected_theta, dllp); "
                             f"method={getattr(method, 'name', method)} is a scorer: use schedule=oneshot, at_init "
                             "or iterative")

    def run(self, ctx: RunContext):
        teacher = None
        if self.pretrained:
            model, _, _ = pretrain(ctx)
            teacher = ctx.clone(model).eval()
        else:
            model = ctx.build_model()
        ft = ctx.finetune
        if self.recipe == "pretrain":
            opt, sched = ctx.cfg.pretrain.optimizer, ctx.cfg.pretrain.scheduler
        else:
            opt, sched = ft.optimizer, ft.scheduler
        model, left = method_prune_stage(ctx, model, schedule=self, optimizer=opt, scheduler=sched)
        return _finetune_units(ctx, model, left, teacher)


def _finetune_units(ctx: RunContext, model, left, teacher):
    """Fine-tune the network a training-time method finished with, enforcing the masks of the units it could
    not remove physically (``left``) with the same fused multiplies as unstructured masks. Returns
    ``(model, None)``: the result is a plain (compacted) network whose pruned units are exactly zero."""
    ft = ctx.finetune
    model, _ = train_stage(ctx, model, left, "finetune", ft.epochs, ft.optimizer, ft.scheduler, teacher,
                           weight_masks=False)
    return model, None
