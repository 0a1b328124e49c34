"""Reliability metrics of a particle ensemble's predictive distribution.

Given per-particle class probabilities ``probs[m, n, c] = p(y_n = c | x_n, z_m)`` for ``M`` particles
(posterior samples, e.g. DLLP's SVGD particles of sub-networks), the ensemble predictive distribution is the
Monte-Carlo posterior predictive ``pbar[n, c] = (1/M) sum_m probs[m, n, c]``. Reported (all averaged over the
``N`` examples):

* ``acc``: accuracy of ``argmax_c pbar`` (torchmetrics, micro average);
* ``nll``: ``-(1/N) sum_n log pbar[n, y_n]`` (natural log);
* ``brier``: ``(1/N) sum_n sum_c (pbar[n, c] - 1[c = y_n])^2`` (summed over classes, range [0, 2]);
* ``ece``: expected calibration error, 15 equal-width confidence bins, L1 (torchmetrics
  ``multiclass_calibration_error``; Guo et al. 2017);
* ``entropy``: predictive entropy ``H[pbar] = -sum_c pbar log pbar`` (nats);
* ``mutual_info``: BALD (Houlsby et al. 2011) ``H[pbar] - (1/M) sum_m H[probs[m]]``, the epistemic part
  of the predictive uncertainty: >= 0 by concavity of the entropy and = 0 when all particles agree;
* ``particle_acc_mean`` / ``particle_acc_sd``: mean and sample standard deviation (ddof = 1; 0 for one
  particle) of the individual particles' accuracies; ``particle_ece_mean`` likewise for their ECE.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_calibration_error

__all__ = ["agreement", "ensemble_metrics", "entropy", "ECE_BINS"]

ECE_BINS = 15
_EPS = 1e-12


def entropy(probs: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy in nats along ``dim`` with the convention ``0 log 0 = 0``."""
    return -(probs * probs.clamp_min(_EPS).log()).sum(dim)


def _check(probs: Tensor, y: Tensor) -> None:
    if probs.dim() != 3:
        raise ValueError(f"probs must have shape (M, N, C), got {tuple(probs.shape)}")
    if y.shape != probs.shape[1:2]:
        raise ValueError(f"labels of shape {tuple(y.shape)} do not match {probs.shape[1]} examples")


def _accuracy(probs: Tensor, y: Tensor) -> float:
    return float(multiclass_accuracy(probs, y, num_classes=probs.shape[-1], average="micro"))


def _ece(probs: Tensor, y: Tensor) -> float:
    return float(
        multiclass_calibration_error(probs, y, num_classes=probs.shape[-1], n_bins=ECE_BINS, norm="l1")
    )


@torch.no_grad()
def ensemble_metrics(probs: Tensor, y: Tensor) -> dict[str, float]:
    """Metrics of the particle-ensemble predictive ``pbar = mean_m probs[m]`` (see the module docstring).

    Args:
        probs: per-particle class probabilities, shape ``(M, N, C)``, each row summing to 1.
        y: integer labels, shape ``(N,)``.
    """
    _check(probs, y)
    probs = probs.double()
    y = y.long()
    pbar = probs.mean(0)
    onehot = torch.nn.functional.one_hot(y, probs.shape[-1]).to(pbar.dtype)
    h_mean = entropy(pbar)
    mean_h = entropy(probs).mean(0)
    particle_acc = torch.tensor([_accuracy(p, y) for p in probs], dtype=torch.float64)
    particle_ece = [_ece(p, y) for p in probs]
    m = probs.shape[0]
    return {
        "acc": _accuracy(pbar, y),
        "nll": float(-pbar.gather(1, y[:, None]).clamp_min(_EPS).log().mean()),
        "brier": float((pbar - onehot).pow(2).sum(1).mean()),
        "ece": _ece(pbar, y),
        "entropy": float(h_mean.mean()),
        "mutual_info": float((h_mean - mean_h).clamp_min(0.0).mean()),
        "particle_acc_mean": float(particle_acc.mean()),
        "particle_acc_sd": float(particle_acc.std(unbiased=True)) if m > 1 else 0.0,
        "particle_ece_mean": float(sum(particle_ece) / m),
        "n_particles": float(m),
        "n_examples": float(probs.shape[1]),
    }


def _labels(pred: Tensor) -> Tensor:
    """Class labels from labels ``(N,)`` or scores/probabilities ``(N, C)`` (argmax)."""
    if pred.dim() == 2:
        return pred.argmax(-1)
    if pred.dim() == 1:
        return pred.long()
    raise ValueError(f"predictions must be labels (N,) or scores (N, C), got {tuple(pred.shape)}")


@torch.no_grad()
def agreement(pred_a: Tensor, pred_b: Tensor) -> float:
    """Fraction of examples on which two predictors choose the same class (labels or scores, argmax)."""
    a, b = _labels(pred_a), _labels(pred_b)
    if a.shape != b.shape:
        raise ValueError(f"cannot compare predictions of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if a.numel() == 0:
        return math.nan
    return float((a == b).double().mean())
