"""Speed options of the training loop (``accel.*``): what changes how fast a stage trains, not what it computes.

* ``channels_last``: NHWC weights and 4-D batches, the layout cuDNN's tensor-core convolutions want with bf16/fp16
  (``trainer.precision=bf16-mixed``); on a CPU it rarely helps.
* ``compile``: ``torch.compile`` of the model for the stage (:meth:`torch.nn.Module.compile`, in place: the same
  parameter objects and the same state-dict keys, so checkpoints, masks and compaction see the model they
  always see). The compiled region is the model's forward only. Masks are enforced outside it, on the
  parameters themselves (gradients zeroed before the optimiser step, weights re-multiplied after it: in-place
  updates of tensors the compiled graph takes as inputs), so no fusion can drop them and pruned weights stay
  exactly zero. The model is returned uncompiled when the stage ends (pruning, compaction, export and latency
  measurement work on the plain module).

Both leave results equal up to floating-point rounding (kernel choice and fusion order), like the thread count;
they are kept out of the run identity (``prunelab.config.NON_IDENTITY``) and recorded with the config.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_accel(opts: Mapping[str, Any]) -> dict[str, Any]:
    """The ``accel`` options as plain values; a clear error naming the option for a wrong one."""
    out = {"channels_last": opts.get("channels_last", False), "compile": opts.get("compile", False),
           "compile_mode": opts.get("compile_mode"), "compile_backend": opts.get("compile_backend", "inductor")}
    for key in ("channels_last", "compile"):
        if not isinstance(out[key], bool):
            raise ValueError(f"accel.{key}={out[key]!r}: must be true or false")
    if out["compile_mode"] not in MODES:
        raise ValueError(f"accel.compile_mode={out['compile_mode']!r}: allowed values: "
                         + ", ".join("null" if m is None else m for m in MODES))
    if out["compile_backend"] == "inductor":  # the default; listing the backends imports dynamo (seconds)
        return out
    if not isinstance(out["compile_backend"], str) or out["compile_backend"] not in torch.compiler.list_backends(
            exclude_tags=()):
        raise ValueError(f"accel.compile_backend={out['compile_backend']!r}: allowed values: "
                         + ", ".join(torch.compiler.list_backends(exclude_tags=())))
    return out


def prepare(model: nn.Module, opts: Mapping[str, Any]) -> None:
    """Apply the options (checked and completed by :func:`check_accel`) to ``model`` for a stage (in place)."""
    opts = check_accel(opts)
    if opts["channels_last"]:
        model.to(memory_format=torch.channels_last)
    if opts["compile"]:
        model.compile(mode=opts["compile_mode"], backend=opts["compile_backend"])


def release(model: nn.Module) -> None:
    """Undo :func:`prepare`'s compilation (the plain forward again); the memory format stays."""
    if getattr(model, "_compiled_call_impl", None) is not None:
        model._compiled_call_impl = None  # what Module.compile set; the parameters were never replaced


def channels_last_input(x: torch.Tensor) -> torch.Tensor:
    """A 4-D batch of images in channels-last memory format (other inputs as they are)."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
