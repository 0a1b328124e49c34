"""Fine-tuning strategies of Qian et al., "Boosting Pruned Networks with Linear Over-parameterization"
(arXiv 2204.11444): ``finetune=overparam`` expands the compact layers into linear blocks for fine-tuning and
merges them back; ``finetune=overparam_spkd`` adds similarity-preserving distillation (Tung & Mori 2019)
from the dense pretrained teacher.

Unstructured masks: the masks name the original weights, which do not exist while the model is expanded, so
they are not enforced during fine-tuning. After the merge the weight is dense in general; with
``remask: true`` it is multiplied by the masks again (the sparsity of the pruned model is kept), with
``remask: false`` (default, as in the paper, which prunes structurally) the merged weights are kept as trained
and the reported sparsity is that of the merged model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from prunelab.finetune.base import Finetune, Prepared
from prunelab.finetune.overparam import count_params, expand_model, merge_model, remask
from prunelab.finetune.spkd import POSITION_MODES, SPKDLoss, default_positions
from prunelab.pruning.masks import MaskSet


class OverParam(Finetune):
    name = "overparam"

    def __init__(self, epochs: int = 10, optimizer: Mapping[str, Any] | None = None,
                 scheduler: Mapping[str, Any] | None = None, expand_ratio: int = 4,
                 layers: str | Sequence[str] = "auto", remask: bool = False, seed: int = 0,
                 keep_best: bool = False):
        super().__init__(epochs, optimizer, scheduler, keep_best)
        if int(expand_ratio) < 1:
            raise ValueError(f"finetune.expand_ratio must be >= 1, got {expand_ratio}")
        self.expand_ratio = int(expand_ratio)
        self.layers = layers if isinstance(layers, str) else list(layers)
        self.remask = bool(remask)
        self.seed = int(seed)

    def prepare(self, model: nn.Module, masks: MaskSet | None, teacher: nn.Module | None) -> Prepared:
        compact_params = count_params(model)
        gen = torch.Generator().manual_seed(self.seed)
        expanded = expand_model(model, ratio=self.expand_ratio, layers=self.layers, generator=gen)
        info = {"expanded_layers": expanded, "params_compact": compact_params,
                "params_expanded": count_params(model), "original_masks": masks}
        return Prepared(model, None, None, info)

    def finish(self, prepared: Prepared) -> tuple[nn.Module, MaskSet | None, dict[str, Any]]:
        model = prepared.model
        merge_model(model)
        masks: MaskSet | None = prepared.info.pop("original_masks", None)
        if masks is not None:
            if self.remask:
                remask(model, {n: m.to(model.get_parameter(n).device) for n, m in masks.items()})
            else:  # report the merged model as it is
                masks = MaskSet({n: model.get_parameter(n).detach() != 0 for n in masks})
        info = dict(prepared.info, params_after_merge=count_params(model), remask=self.remask)
        return model, masks, info


class OverParamSPKD(OverParam):
    """Over-parameterization + ``gamma * sum L_SP`` between the student's expanded blocks (or stage outputs)
    and the same positions of the dense teacher.

    ``positions`` defaults to ``"stages"`` (stage outputs, as in Tung & Mori, for which gamma = 3000 was tuned):
    with ``"expanded"`` the sum runs over every expanded block (57 terms for ResNet-56), and at gamma = 3000
    fine-tuning diverged in the reduced-scale check of docs/methods/overparam.md."""

    name = "overparam_spkd"

    def __init__(self, *args, gamma: float = 3000.0, positions: str | Sequence[str] = "stages", **kwargs):
        super().__init__(*args, **kwargs)
        if isinstance(positions, str) and positions not in POSITION_MODES:
            raise ValueError(f"finetune.positions={positions!r}; allowed values: {', '.join(POSITION_MODES)}, or a "
                             "list of module names")
        self.gamma = float(gamma)
        self.positions = positions if isinstance(positions, str) else list(positions)

    def prepare(self, model, masks, teacher):
        if teacher is None:
            raise ValueError("finetune=overparam_spkd needs the dense teacher: use schedule=oneshot or iterative")
        prepared = super().prepare(model, masks, teacher)
        positions = (default_positions(model, self.positions) if isinstance(self.positions, str)
                     else self.positions)
        spkd = SPKDLoss(teacher, model, positions, gamma=self.gamma)

        def extra_loss(student, x, y, logits):
            if next(spkd.teacher.parameters()).device != x.device:
                spkd.to(x.device)
            return spkd(x)

        prepared.extra_loss = extra_loss
        prepared.info["spkd"] = {"positions": positions, "gamma": self.gamma}
        prepared.info["_spkd"] = spkd
        return prepared

    def finish(self, prepared):
        spkd = prepared.info.pop("_spkd", None)
        if spkd is not None:
            spkd.remove()  # hooks on expanded blocks must go before the blocks are merged away
        return super().finish(prepared)
