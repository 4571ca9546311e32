"""Combining the scores of a reward-model ensemble (Coste et al. 2023, "Reward Model Ensembles
Help Mitigate Overoptimization": mean, worst case, uncertainty weighted).

``scores`` is ``(M, B)``: M members' scores of B samples, on one scale (see
``reward.ensemble.standardize``). The std across members divides by M (the ensemble's own
spread, not an estimate of a population's): for two members it is ``|a - b| / 2``.
"""

from __future__ import annotations

import torch

ENSEMBLE_COMBINES = ("mean", "min", "mean_minus_std")


def ensemble_std(scores: torch.Tensor) -> torch.Tensor:
    """Per-sample std across members, ``(M, B) -> (B,)``, divisor M."""
    return scores.std(dim=0, correction=0)


def combine_ensemble(scores: torch.Tensor, combine: str, k: float = 1.0) -> torch.Tensor:
    """One score per sample, ``(M, B) -> (B,)``: ``mean``, ``min`` (worst case) or
    ``mean_minus_std`` (mean - k * std, uncertainty weighted)."""
    if combine == "mean":
        return scores.mean(0)
    if combine == "min":
        return scores.min(0).values
    if combine == "mean_minus_std":
        return scores.mean(0) - k * ensemble_std(scores)
    raise ValueError(f"unknown ensemble combine {combine!r}; expected one of {ENSEMBLE_COMBINES}")
