"""Random pruning: i.i.d. uniform scores from a seeded generator. With a quota allocation (uniform, ERK,
IGQ) each layer loses exactly floor(s_l n_l) weights chosen uniformly at random; with ``global`` the
per-layer counts are random too."""

from __future__ import annotations

import torch

from prunelab.pruning.scorers.base import Scorer


class RandomScorer(Scorer):
    name = "random"
    def __init__(self, seed: int = 0):
        self.seed = seed

    def score(self, model, masks, batches=()):
        g = torch.Generator().manual_seed(int(self.seed))
        return {n: torch.rand(m.shape, generator=g) for n, m in masks.items()}
