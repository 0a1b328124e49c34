"""Structured pruning: channel groups (Torch-Pruning DepGraph), gates, Taylor/oracle criteria, the
iterative structured pruner, and physical removal of pruned channels (compaction)."""

from prunelab.pruning.structured.pruner import PruneSchedule, StructuredPruner, per_group_masks
from prunelab.pruning.units.compact import CostModel, compact, export_onnx, load_compact, save_compact
from prunelab.pruning.units.gates import Gates
from prunelab.pruning.units.groups import ChannelGroup, build_groups, param_masks

__all__ = ["ChannelGroup", "CostModel", "Gates", "PruneSchedule", "StructuredPruner", "build_groups", "compact",
           "export_onnx", "load_compact", "param_masks", "per_group_masks", "save_compact"]
