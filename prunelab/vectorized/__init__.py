"""Many small runs at once: N independent copies of a small network trained in one process as one
vectorised model (``torch.func.stack_module_state`` + ``functional_call`` under ``torch.vmap``).

Only the *training loops* are vectorised; everything else of every copy (validation of its config, data,
init, dense cache, scoring and masks, evaluation, stage records, ``results.json``) is the pipeline's own
code, run per copy. :mod:`~prunelab.vectorized.runner` explains how: each copy runs its schedule through
:func:`prunelab.pipeline.run.run_pipeline`; a training stage that has not been trained yet stops the copy
and is queued; the queued stages of all copies are trained together (:mod:`~prunelab.vectorized.train`);
the copies then run again, the pipeline reloading finished stages from its own records and the trained
weights of the queued stage taking the place of the Lightning fit.

Every copy is validated after every epoch as its Lightning loop validates it (own validation split, the
same ``<stage>/val/acc`` and ``<stage>/val/loss`` reductions), so a fine-tuning stage records the same
``<stage>/val/acc_best`` etc. (:class:`~prunelab.pipeline.tracking.ValidationTracker`) and
``finetune.keep_best`` restores each copy's own best epoch; ``vectorized.json`` in a run folder says which
of its stages the vectorised loop trained.

Scope (anything else runs the normal way, with a log line saying why): tensor-held data without
augmentation, unstructured scorers (masks per copy from the pipeline's own scorer and allocation),
schedules ``oneshot`` and ``at_init``, ``finetune=vanilla`` (with or without ``keep_best``), one process on
the CPU or one GPU, 32-bit precision, validation after every epoch (no ``check_val_every_n_epoch`` /
``val_check_interval``), no configured Lightning callbacks, models without BatchNorm, Dropout or buffers.
"""

from prunelab.vectorized.runner import Outcome, run_vectorized, why_not

__all__ = ["Outcome", "run_vectorized", "why_not"]
