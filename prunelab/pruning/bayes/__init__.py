"""Bayesian structured pruning: BMRS (log-normal multiplicative noise + Bayesian model reduction) and DLLP
(Stein variational gate particles with reliability estimates)."""

from prunelab.pruning.bayes.bmrs import (
           BMRSPruner,
           LogNormalNoise,
           delta_f_n,
           delta_f_u,
           insert_noise,
           kl_loss,
)
from prunelab.pruning.bayes.dllp import DLLP, attach_gates, log_prior, prior_keep_prob

__all__ = ["DLLP", "BMRSPruner", "LogNormalNoise", "attach_gates", "delta_f_n", "delta_f_u", "insert_noise",
           "kl_loss", "log_prior", "prior_keep_prob"]
