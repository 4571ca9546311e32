"""PPO losses (Schulman et al. 2017) over response tokens, and how per-token losses are aggregated.

Inputs are `(B, T)` aligned to response tokens with `mask` 1 at valid ones. Stats are detached
0-dim tensors (no device sync per minibatch; the caller converts with `float`).

Loss aggregation (`ppo.loss_agg`; Liu et al. 2025 "Dr. GRPO", Yu et al. 2025 "DAPO"), for per-token
losses l_it of B rows with L_i valid tokens each:
- `token_mean`: sum_i sum_t l_it / sum_i L_i. Every token weighs the same, so long responses weigh
  more than short ones (DAPO's choice; PPO's usual one).
- `seq_mean_token_mean`: (1/B) sum_i (sum_t l_it / L_i). Every sequence weighs the same, so a
  token of a short response weighs more than one of a long response (the original GRPO): this
  biases towards short correct and long wrong answers, which Dr. GRPO points out.
- `seq_mean_token_sum`: (1/B) sum_i sum_t l_it. Every token weighs the same within and across
  sequences, normalised by the row count rather than the token count (Dr. GRPO's unbiased
  aggregation without its constant length divisor). Its gradient is about the mean response
  length times `token_mean`'s, so switching to it changes the effective learning rate.
- `seq_mean_token_sum_norm`: (1/B) sum_i sum_t l_it / T, T the response width (`mask.shape[-1]`,
  always `rollout.max_new_tokens` here): Dr. GRPO's constant normaliser (veRL's mode of the same
  name, whose divisor is also `loss_mask.shape[-1]`). Same weighting as `seq_mean_token_sum`,
  on the scale of `token_mean` when responses fill the width.
`aggregation_weight` gives the denominator's count (tokens or rows): a learner rank scales its
local loss by weight_local * ranks / weight_global, so that the gradient averaged over ranks is
that of the loss over the global minibatch, for every aggregation.
"""

from __future__ import annotations

import torch

from rlhf_ray.algo.advantages import masked_mean
from rlhf_ray.algo.kl import estimate_kl

LOSS_AGGREGATIONS = (
    "token_mean",
    "seq_mean_token_mean",
    "seq_mean_token_sum",
    "seq_mean_token_sum_norm",
)

LOG_RATIO_CLAMP = 20.0
"""log(pi / pi_old) is clamped to +-this before exp in the policy loss (veRL's `negative_approx_kl`
clamp), so a token whose log-prob moved far cannot overflow the ratio to inf."""


def aggregate_loss(losses: torch.Tensor, mask: torch.Tensor, agg: str) -> torch.Tensor:
    """Per-token `losses` `(B, T)` -> a 0-dim loss by `agg` (see the module docstring)."""
    m = mask.to(losses.dtype)
    if agg == "token_mean":
        return (losses * m).sum() / m.sum()
    if agg == "seq_mean_token_mean":
        return ((losses * m).sum(1) / m.sum(1)).mean()
    if agg == "seq_mean_token_sum":
        return (losses * m).sum(1).mean()
    if agg == "seq_mean_token_sum_norm":
        return (losses * m).sum(1).mean() / m.shape[-1]
    raise ValueError(f"unknown loss aggregation {agg!r}; expected one of {LOSS_AGGREGATIONS}")


def aggregation_weight(mask: torch.Tensor, agg: str) -> float:
    """What `aggregate_loss(., mask, agg)` divides by: valid tokens (`token_mean`) or rows."""
    if agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {agg!r}; expected one of {LOSS_AGGREGATIONS}")
    return float(mask.sum()) if agg == "token_mean" else float(mask.shape[0])


def kl_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    estimator: str,
    agg: str = "token_mean",
) -> torch.Tensor:
    """KL(pi || pi_ref) as a loss term (GRPO's way, instead of a reward penalty): the per-token
    `estimator` ("k2" or "k3") of the current `logprobs`, aggregated by `agg`. `(B, T)` -> 0-dim."""
    return aggregate_loss(estimate_kl(logprobs, ref_logprobs, estimator), mask, agg)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    agg: str = "token_mean",
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate, PPO eq. 7 negated: max(-A * rho, -A * clip(rho, 1-eps, 1+eps)) per
    token, aggregated by `agg` (default: the mean over valid tokens). log(rho) is clamped to
    +-LOG_RATIO_CLAMP first.

    `dual_clip` c > 1 (Ye et al. 2020, "Mastering Complex Control in MOBA Games", eq. 5; veRL's
    `clip_ratio_c`): where A < 0 the per-token loss is also capped at -A * c, so a token whose
    ratio grew far past 1 + eps under a negative advantage gives a bounded loss (and no
    gradient) instead of -A * rho. None: off.

    All inputs `(B, T)`. Stats, token means whatever `agg`: `clipfrac` (share of valid tokens
    where the clipped term is the active one, so they get no gradient), `approx_kl` (k2
    estimator, mean of 0.5 * log(rho)^2), `ratio_mean`, and with `dual_clip` `dual_clipfrac`.
    """
    log_ratio = (logprobs - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_token = torch.max(pg_losses, pg_losses_clipped)
    if dual_clip is not None:
        capped = torch.min(per_token, -advantages * dual_clip)
        dual = (advantages < 0) & (capped < per_token)
        per_token = torch.where(advantages < 0, capped, per_token)
    loss = aggregate_loss(per_token, mask, agg)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg_losses_clipped > pg_losses).to(ratio.dtype), mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
        if dual_clip is not None:
            stats["dual_clipfrac"] = masked_mean(dual.to(ratio.dtype), mask)
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
