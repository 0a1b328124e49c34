"""Fine-tuning strategies: vanilla, linear over-parameterization (expand/merge), SP-KD distillation."""

from prunelab.finetune.base import Finetune, Prepared

__all__ = ["Finetune", "Prepared"]
