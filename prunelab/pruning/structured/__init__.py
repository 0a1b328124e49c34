"""The Taylor family's own mathematics (Molchanov et al., CVPR 2019): unit importance criteria and the oracle
(:mod:`.criteria`), the iterative structured pruner (:mod:`.pruner`), the pipeline method (:mod:`.method`)
and network slimming (:mod:`.slimming`). Groups, gates, sites and compaction are the units' ground floor,
:mod:`prunelab.pruning.units`."""

from prunelab.pruning.structured.pruner import PruneSchedule, StructuredPruner, per_group_masks

__all__ = ["PruneSchedule", "StructuredPruner", "per_group_masks"]
