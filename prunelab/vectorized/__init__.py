"""Many small runs at once: N independent copies of a small network trained in one process as one
vectorised model (``torch.func.stack_module_state`` + ``functional_call`` under ``torch.vmap``).

Only the *training loops* are vectorised; everything else of every copy (validation of its config, data,
init, dense cache, scoring and masks, evaluation, stage records, ``results.json``) is the pipeline's own
code, run per copy. :mod:`~prunelab.vectorized.runner` explains how: each copy runs its schedule through
:func:`prunelab.pipeline.run.run_pipeline`; a training stage that has not been trained yet stops the copy
and is queued; the queued stages of all copies are trained together (:mod:`~prunelab.vectorized.train`);
the copies then run again, the pipeline reloading finished stages from its own records and the trained
weights of the queued stage taking the place of the Lightning fit.

Scope (anything else runs the normal way, with a log line saying why): tensor-held data without
augmentation, unstructured scorers (masks per copy from the pipeline's own scorer and allocation),
schedules ``oneshot`` and ``at_init``, ``finetune=vanilla``, one process on the CPU or one GPU, 32-bit
precision, models without BatchNorm, Dropout or buffers.
"""

from prunelab.vectorized.runner import Outcome, run_vectorized, why_not

__all__ = ["Outcome", "run_vectorized", "why_not"]
