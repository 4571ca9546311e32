"""Comparing two policies on the same prompts (``rlhf-ray eval``), with 95% intervals.

Both intervals are paired: each prompt gives one outcome (win 1, tie 0.5, loss 0) and one
reward difference, so the prompt-to-prompt spread that both policies share cancels.
- ``win_rate_interval``: Wilson's score interval (Wilson 1927) for the win rate p over n
  prompts, ``(p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)``; with ties counting
  half p is (wins + ties/2) / n. Its width is about ``2 z sqrt(p(1-p)/n)`` (0.245 at p = 0.5,
  n = 64). With no ties it is scipy's ``binomtest(...).proportion_ci(method="wilson")``.
- ``mean_difference_interval``: the paired t interval of the mean reward difference
  (``scipy.stats.ttest_1samp``).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch

from rlhf_ray.algo.kl import estimate_kl


def win_rate(scores: torch.Tensor, baseline_scores: torch.Tensor) -> float:
    """Fraction of prompts on which the policy's score beats the baseline's, ties counting half:
    ``mean(1[s > b] + 0.5 * 1[s == b])``. Both ``(B,)``, row ``i`` = the same prompt."""
    if scores.shape != baseline_scores.shape or scores.ndim != 1 or len(scores) == 0:
        raise ValueError(
            f"need two equal, non-empty (B,) tensors: {scores.shape} vs {baseline_scores.shape}"
        )
    wins = (scores > baseline_scores).float() + 0.5 * (scores == baseline_scores).float()
    return float(wins.mean())


def sequence_kl(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    estimator: str = "k1",
) -> torch.Tensor:
    """``(B,)`` KL of each sampled response: the per-token estimate (``algo.kl``) summed over its
    tokens. With samples drawn from the policy, its mean estimates KL(policy || reference) per
    sequence. Inputs ``(B, R)``; ``response_mask`` is 1 on response tokens."""
    return (estimate_kl(logprobs, ref_logprobs, estimator) * response_mask).sum(-1)


def win_rate_interval(win_rate: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval ``(low, high)`` of a win rate measured on ``n`` paired prompts."""
    if n < 1 or not 0.0 <= win_rate <= 1.0:
        raise ValueError(f"need n >= 1 and a win rate in [0, 1], got n={n}, {win_rate}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    centre = (win_rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(win_rate * (1 - win_rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_difference_interval(
    differences: torch.Tensor, confidence: float = 0.95
) -> tuple[float, float]:
    """Paired t interval ``(low, high)`` of ``mean(differences)`` (policy - baseline per prompt,
    ``(B,)``); ``(mean, mean)`` for a single prompt or no spread (nothing to estimate from)."""
    d = differences.double().numpy()
    if len(d) < 2 or float(d.std()) == 0.0:
        return float(d.mean()), float(d.mean())
    from scipy import stats  # (imported here: scipy costs each process a second to import)

    ci = stats.ttest_1samp(d, 0.0).confidence_interval(confidence)
    return float(ci.low), float(ci.high)


def mean_interval(values: torch.Tensor, confidence: float = 0.95) -> tuple[float, float]:
    """95% interval ``(low, high)`` of the mean of one model's per-prompt rewards ``(B,)``:
    Wilson's interval when every value is 0 or 1 (an accuracy, e.g. a verifiable reward), else
    the one-sample t interval; ``(mean, mean)`` when there is nothing to estimate from."""
    v = values.double()
    if len(v) == 0:
        raise ValueError("need at least one value")
    if bool(((v == 0) | (v == 1)).all()):
        return win_rate_interval(float(v.mean()), len(v), confidence)
    return mean_difference_interval(v, confidence)  # the same t interval of a mean


def prompts_to_exclude_half(win_rate: float, confidence: float = 0.95) -> int | None:
    """About how many prompts a win rate this far from 0.5 needs before its interval excludes
    0.5 (``n = z^2 p (1 - p) / (p - 0.5)^2``); None at exactly 0.5."""
    if win_rate == 0.5:
        return None
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    return math.ceil(z * z * max(win_rate * (1 - win_rate), 1e-3) / (win_rate - 0.5) ** 2)
