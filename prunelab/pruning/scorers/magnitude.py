"""Magnitude pruning (Han et al. 2015; Frankle & Carbin 2019): score = |w|."""

from __future__ import annotations

from prunelab.pruning.scorers.base import Scorer


class MagnitudeScorer(Scorer):
    name = "magnitude"
    def score(self, model, masks, batches=()):
        return {n: model.get_parameter(n).detach().abs() for n in masks}
