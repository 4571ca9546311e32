"""Comparing two policies on the same prompts (``rlhf-ray eval``)."""

from __future__ import annotations

import torch

from rlhf_ray.algo.kl import estimate_kl


def win_rate(scores: torch.Tensor, baseline_scores: torch.Tensor) -> float:
    """Fraction of prompts on which the policy's score beats the baseline's, ties counting half:
    ``mean(1[s > b] + 0.5 * 1[s == b])``. Both ``(B,)``, row ``i`` = the same prompt."""
    if scores.shape != baseline_scores.shape or scores.ndim != 1 or len(scores) == 0:
        raise ValueError(f"need two equal, non-empty (B,) tensors: {scores.shape} vs "
                         f"{baseline_scores.shape}")  # fmt: skip
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
