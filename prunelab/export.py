"""Files a pruned network is saved as at the end of a run, and how prunelab loads them back.

Structured runs (the compacted, physically smaller network), in the run folder:

- ``model_compact.pt2``: a ``torch.export`` program, loadable by **plain PyTorch** (no prunelab, no model
  code): ``torch.export.load("model_compact.pt2").module()(x)``; the batch dimension is dynamic. Written only
  after a check: the saved program is loaded back and its outputs on a random batch must equal the model's.
- ``model_compact_state_dict.pt``: the state dict (tensors only; ``torch.load(..., weights_only=True)``).
- ``model_compact.pt``: the pickled module (``torch.load(..., weights_only=False)``; the pickle refers to the
  model's classes, so it needs prunelab -- or the user's package -- importable).
- ``model_compact.onnx`` with ``measure.onnx=true``.

Unstructured runs (a masked network of the configured architecture): ``model_final.pt`` =
``{"state_dict", "masks", "model_config", "input_shape", "num_classes"}`` (tensors, dicts and lists only:
``torch.load(..., weights_only=True)`` reads it); ``model_config`` is the resolved ``model`` config, so
:func:`load_model_file` rebuilds the network with ``hydra.utils.instantiate`` and ``prunelab-eval`` evaluates it.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunelab.utils.io import _atomic, atomic_torch_save

log = logging.getLogger(__name__)

FINAL_FILE = "model_final.pt"
COMPACT_FILE = "model_compact.pt"
PROGRAM_FILE = "model_compact.pt2"
STATE_FILE = "model_compact_state_dict.pt"


def _plain_eval_copy(model: nn.Module) -> nn.Module:
    from prunelab.pruning.units.gates import strip_gate_hooks

    model = copy.deepcopy(model).cpu().eval()
    strip_gate_hooks(model)
    return model


def export_program(model: nn.Module, path: str | Path, input_shape: tuple[int, ...], atol: float = 1e-5) -> None:
    """``torch.export`` ``model`` (eval mode, dynamic batch) to ``path`` and check the saved file: loaded
    back, it must give the model's outputs on a random batch of another size (within ``atol``)."""
    model = _plain_eval_copy(model)
    batch = torch.export.Dim.DYNAMIC
    with torch.no_grad():
        program = torch.export.export(model, (torch.randn(2, *input_shape),), dynamic_shapes=({0: batch},))
    path = Path(path)
    _atomic(path, lambda f: torch.export.save(program, f))
    x = torch.randn(3, *input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = torch.export.load(path).module()(x), model(x)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=atol):
        path.unlink()
        raise RuntimeError(f"the exported program differs from the model (max |diff| "
                           f"{(got - want).abs().max().item() if got.shape == want.shape else 'shape'}); not saved")


def export_compact(model: nn.Module, run_dir: str | Path, input_shape: tuple[int, ...],
                   onnx: bool = False) -> list[str]:
    """Write the compacted network in every format above; returns the files written. A format that fails
    (``torch.export`` cannot trace every model) is logged as a warning and skipped: the others are still
    written, and the pickled module always is."""
    from prunelab.pruning.units.compact import export_onnx, save_compact

    run_dir = Path(run_dir)
    model = _plain_eval_copy(model)
    save_compact(model, run_dir / COMPACT_FILE)
    atomic_torch_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, run_dir / STATE_FILE)
    written = [COMPACT_FILE, STATE_FILE]
    try:
        export_program(model, run_dir / PROGRAM_FILE, tuple(input_shape))
        written.append(PROGRAM_FILE)
    except Exception as e:  # noqa: BLE001 - an export failure must not lose the finished run
        log.warning("model_compact.pt2 not written: torch.export failed (%s: %s)", type(e).__name__,
                    str(e).splitlines()[0] if str(e) else "")
    if onnx:
        export_onnx(model, run_dir / "model_compact.onnx", torch.zeros(1, *input_shape))
        written.append("model_compact.onnx")
    log.info("compacted model saved: %s", ", ".join(str(run_dir / f) for f in written))
    return written


def save_final(model: nn.Module, masks, model_config: dict, input_shape: tuple[int, ...], num_classes: int,
               path: str | Path) -> None:
    """``model_final.pt`` of an unstructured run (see the module docstring)."""
    atomic_torch_save({
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "masks": masks.state_dict() if masks is not None else None,
        "model_config": model_config,
        "input_shape": [int(s) for s in input_shape],
        "num_classes": int(num_classes),
    }, path)


def load_model_file(path: str | Path, model_config: dict | None = None, input_shape=None,
                    num_classes: int | None = None) -> tuple[nn.Module, Any, bool]:
    """(model, masks or None, rebuilt) from a file prunelab wrote: ``model_final.pt``, ``model_compact.pt``, or
    a stage record ``stages/<stage>.pt``. ``rebuilt``: the network was built from a config (the file's, else
    ``model_config``, ``input_shape``, ``num_classes``) and loaded with a state dict, as the run built it; False
    when the file holds the module itself (a compacted or restructured network). Trusted files only: the
    pickled module is unpickled."""
    from hydra.utils import instantiate

    from prunelab.pruning.masks import MaskSet

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, nn.Module):
        return obj.eval(), None, False
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a model file written by prunelab (a {type(obj).__name__})")
    if isinstance(obj.get("module"), nn.Module):  # a stage record of a compacted / restructured model
        masks = MaskSet.from_state_dict(obj["masks"]) if obj.get("masks") is not None else None
        return obj["module"].eval(), masks, False
    state = obj.get("state_dict", obj.get("model"))
    config = obj.get("model_config", model_config)
    shape = obj.get("input_shape", input_shape)
    classes = obj.get("num_classes", num_classes)
    if input_shape is not None and [int(s) for s in shape] != [int(s) for s in input_shape]:
        raise ValueError(f"{path.name} expects inputs of shape {list(shape)}, the data gives {list(input_shape)}: "
                         "choose data of that shape")
    if state is None or config is None or shape is None or classes is None:
        raise ValueError(f"{path} holds no model (expected model_final.pt, model_compact.pt or a stage record "
                         "with the run's config)")
    model = instantiate(config, input_shape=tuple(int(s) for s in shape), num_classes=int(classes))
    model.load_state_dict(state)
    masks = MaskSet.from_state_dict(obj["masks"]) if obj.get("masks") is not None else None
    if masks is not None:
        masks.apply(model)
    return model.eval(), masks, True
