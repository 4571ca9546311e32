"""PPO losses (Schulman et al. 2017) over response tokens, averaged over valid tokens.

Inputs are `(B, T)` aligned to response tokens with `mask` 1 at valid ones. Stats are detached
0-dim tensors (no device sync per minibatch; the caller converts with `float`).
"""

from __future__ import annotations

import torch

from rlhf_ray.algo.advantages import masked_mean


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate, PPO eq. 7 negated: mean of max(-A * rho, -A * clip(rho, 1-eps, 1+eps)).

    All inputs `(B, T)`. Stats: `clipfrac` (share of valid tokens where the clipped term is the
    active one, so they get no gradient), `approx_kl` (k2 estimator, mean of 0.5 * log(rho)^2),
    `ratio_mean`.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.max(pg_losses, pg_losses_clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg_losses_clipped > pg_losses).to(ratio.dtype), mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * mean of max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2).

    All inputs `(B, T)`. Stats: `vf_clipfrac`, share of valid tokens where the clipped term wins.
    """
    values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    vf_losses = (values - returns) ** 2
    vf_losses_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(vf_losses, vf_losses_clipped), mask)
    with torch.no_grad():
        vf_clipfrac = masked_mean((vf_losses_clipped > vf_losses).to(values.dtype), mask)
    return loss, {"vf_clipfrac": vf_clipfrac}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-token entropy `(B, T)` of logits `(B, T, V)`: H = logsumexp(z) - sum(softmax(z) * z)."""
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def masked_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy over valid tokens; logits `(B, T, V)`, mask `(B, T)` -> 0-dim."""
    return masked_mean(entropy_from_logits(logits), mask)
