"""Reward-score normalisation: running moments over every score seen so far (OpenRLHF's and TRL's
``RunningMoments``), or fixed statistics (a batch's own, or a reward model's stored ones).

The running statistics are merged with the parallel-variance formula (Chan et al. 1979) in float64,
so after rounds ``x_1 .. x_n`` they equal the mean and (unbiased) standard deviation of all
scores concatenated. A round is normalised with the statistics that include it.
"""

from __future__ import annotations

import math

import torch


class RunningMoments:
    """Mean and variance of every value passed to ``update`` so far."""

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean

    @property
    def std(self) -> float:
        """Unbiased standard deviation (1.0 until two values have been seen)."""
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0

    def update(self, values: torch.Tensor) -> None:
        x = values.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return
        batch_mean = float(x.mean())
        batch_m2 = float(((x - batch_mean) ** 2).sum())
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    def normalize(self, values: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        """``(values - mean) / (std + eps)`` with the current statistics."""
        return standardize(values, self.mean, self.std, eps)

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), state["mean"], state["m2"]


def standardize(values: torch.Tensor, mean: float, std: float, eps: float = 1e-8) -> torch.Tensor:
    """``(values - mean) / (std + eps)``, in the dtype of ``values``."""
    return ((values.double() - mean) / (std + eps)).to(values.dtype)
