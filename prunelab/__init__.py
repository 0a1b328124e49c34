"""prunelab: a framework for neural-network pruning research.

Layers (imports only point down): cli -> pipeline -> {finetune, pruning, metrics, models, data}.
"""

__version__ = "0.1.0"
