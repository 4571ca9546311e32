"""Critic-free advantage estimators over groups of samples (GRPO, RLOO, REINFORCE++).

A round holds ``G`` prompts with ``n`` samples each, laid out contiguously: group ``g`` is rows
``[g*n, (g+1)*n)`` (``rollout.samples_per_prompt``). Sequence-level estimators (GRPO, RLOO) turn a
scalar reward per row into a scalar advantage per row, broadcast to every valid response token;
REINFORCE++ works per token. All outputs are ``(B, T)``, 0 at invalid positions, detached.

- GRPO (Shao et al. 2024, "DeepSeekMath", §4.1.2): A_i = (r_i - mean_g) / (std_g + eps) with the
  mean and (unbiased) std of the row's group; without std normalisation A_i = r_i - mean_g (as Dr.
  GRPO recommends, Liu et al. 2025). A group whose rewards are all equal has std 0: its
  advantages are exactly 0 (no signal, no NaN).
- RLOO (Ahmadian et al. 2024, "Back to Basics"): A_i = r_i - mean_{j != i} r_j, the leave-one-out
  baseline, which equals n / (n - 1) * (r_i - mean_g).
- REINFORCE++ (Hu 2025): per-token returns G_t = sum_{k >= t} gamma^(k-t) r_k of the KL-penalised
  token rewards (score at the last token), whitened over every valid token of the global batch.
"""

from __future__ import annotations

import torch

from rlhf_ray.algo.advantages import masked_mean, masked_var


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(B,)`` -> ``(B / n, n)``; ValueError unless ``n`` divides ``B``."""
    if group_size < 1 or len(rewards) % group_size:
        raise ValueError(f"{len(rewards)} rows do not form groups of {group_size}")
    return rewards.view(-1, group_size)


def _per_token(per_row: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return per_row[:, None].to(torch.float32) * mask.to(torch.float32)


@torch.no_grad()
def grpo_advantages(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
    norm_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """GRPO: each row's reward minus its group's mean, divided by (group std + ``eps``) if
    ``norm_std``. rewards: ``(B,)`` sequence rewards; mask: ``(B, T)``. Needs ``n >= 2``."""
    if group_size < 2:
        raise ValueError("GRPO needs at least 2 samples per prompt")
    groups = _groups(rewards.to(torch.float32), group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if norm_std:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return _per_token(centred.flatten(), mask)


@torch.no_grad()
def rloo_advantages(rewards: torch.Tensor, mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: each row's reward minus the mean reward of the other rows of its group.
    rewards: ``(B,)``; mask: ``(B, T)``. Needs ``n >= 2``."""
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    groups = _groups(rewards.to(torch.float32), group_size)
    others = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return _per_token((groups - others).flatten(), mask)


@torch.no_grad()
def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma * G_{t+1} per row, over valid tokens; ``(B, T)`` -> ``(B, T)``."""
    mask = mask.to(rewards.dtype)
    rewards = rewards * mask
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns * mask


@torch.no_grad()
def reinforce_pp_advantages(
    token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++: (advantages, returns), both ``(B, T)``. Returns are the discounted sums of
    the KL-penalised token rewards; advantages are the returns whitened over every valid token
    of the batch: (G - mean) / sqrt(var + eps), 0 everywhere if all returns are equal."""
    returns = discounted_returns(token_rewards, mask, gamma)
    mean = masked_mean(returns, mask)
    var = masked_var(returns, mask) if mask.sum() > 1 else torch.zeros_like(mean)
    advantages = (returns - mean) * torch.rsqrt(var + eps)
    return advantages * mask.to(returns.dtype), returns


@torch.no_grad()
def sequence_rewards(token_rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The total reward of each row: its score minus its KL penalty, ``(B, T)`` -> ``(B,)``."""
    return (token_rewards * mask.to(token_rewards.dtype)).sum(dim=1)
