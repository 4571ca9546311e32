"""Masked statistics, KL-penalized rewards and GAE.

All `(B, T)` tensors are aligned to response tokens; `mask` is 1 at valid response tokens,
contiguous from position 0 (right-padded responses), 0 after. Standard formulation as in TRL and
Huang et al. 2022, "The N Implementation Details of RLHF with PPO".
"""

from __future__ import annotations

import torch

from rlhf_ray.algo.kl import estimate_kl


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over positions where `mask` is 1; over all elements if `dim` is None.

    x, mask: `(B, T)`. Returns a 0-dim tensor, or `(B,)` / `(T,)` when `dim` is given.
    """
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum()
    return (x * mask).sum(dim) / mask.sum(dim)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `x` `(B, T)` over all valid elements; a 0-dim tensor.

    With `unbiased`, Bessel's correction n / (n - 1), n = number of valid elements.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            raise ValueError(f"unbiased masked_var needs at least 2 valid elements, got {int(n)}")
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) with the (unbiased) mean/var of the valid elements.

    x, mask: `(B, T)` -> `(B, T)`. If not `shift_mean`, the mean is added back (only the scale is
    normalized). Invalid positions are 0 in the output.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


@torch.no_grad()
def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016, eq. 16), per row.

    rewards, values, mask: `(B, T)`. Returns (advantages, returns), both `(B, T)`, detached and
    0 at invalid positions; returns = advantages + values.
        delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1}
    Masking values and rewards first makes V_{t+1} = 0 past the last valid token, i.e. the episode
    ends there and nothing is bootstrapped.
    """
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(values)
    last_gae = torch.zeros_like(values[:, 0])
    T = values.shape[1]
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t + 1 < T else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages[:, t] = last_gae
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


@torch.no_grad()
def kl_penalized_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards r_t = -kl_coef * kl_t, plus the sequence score at the last valid token.

    scores: `(B,)`; logprobs, ref_logprobs, mask: `(B, T)`. Returns (rewards, kl), both `(B, T)`,
    0 at invalid positions (Ziegler et al. 2019, eq. 2, spread per token).
    """
    mask = mask.to(logprobs.dtype)
    empty = (mask.sum(1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"rows {empty} have no valid response token")
    kl = estimate_kl(logprobs, ref_logprobs, estimator) * mask
    rewards = -kl_coef * kl
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, -1).max(dim=1).values
    rewards[torch.arange(mask.shape[0], device=mask.device), last] += scores.to(rewards.dtype)
    return rewards, kl


@torch.no_grad()
def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[returns - values] / Var[returns] over valid tokens; `(B, T)` inputs.

    1 is a perfect critic, 0 no better than a constant, negative worse. NaN if Var[returns] == 0.
    """
    var_returns = masked_var(returns, mask, unbiased=False)
    if var_returns == 0:
        return float("nan")
    return float(1.0 - masked_var(returns - values, mask, unbiased=False) / var_returns)
