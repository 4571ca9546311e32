"""The driver's side of the estimators: rows of a round in groups, and step 3 per estimator."""

from __future__ import annotations

import math

import pytest
import torch
from test_loop import _rollout

from rlhf_ray.config.ppo import AlgoConfig, PPOConfig
from rlhf_ray.ppo.loop import compute_advantages, critic_free_advantages, expand_groups


def test_each_prompt_index_becomes_a_group_of_consecutive_rows():
    assert expand_groups([3, 1, 3], 2) == [3, 3, 1, 1, 3, 3]
    assert expand_groups([5, 0], 1) == [5, 0]


# token rewards (KL penalties + score at the last token) of 2 groups of 2; row 3 is ragged and
# its padded position holds garbage. Sequence rewards: 1.0, 3.0 | 1.0, 2.0
REWARDS = torch.tensor([[-0.1, 1.1], [0.0, 3.0], [0.5, 0.5], [2.0, 9.0]])
MASK = torch.tensor([[1, 1], [1, 1], [1, 1], [1, 0]])


def _per_token(values: list[float]) -> torch.Tensor:
    return torch.tensor(values)[:, None] * MASK


@pytest.mark.parametrize(
    ("algo", "expected"),
    [
        (AlgoConfig(estimator="rloo"), [-2.0, 2.0, -1.0, 1.0]),
        (AlgoConfig(estimator="grpo", grpo_norm_std=False), [-1.0, 1.0, -0.5, 0.5]),
        # group std sqrt(2) and sqrt(0.5): every advantage is +-1/sqrt(2)
        (AlgoConfig(estimator="grpo"), [-(0.5**0.5), 0.5**0.5, -(0.5**0.5), 0.5**0.5]),
    ],
    ids=["rloo", "grpo-mean", "grpo-std"],
)
def test_group_estimators_use_the_kl_penalised_sequence_reward(algo, expected):
    advantages, returns = critic_free_advantages(REWARDS, MASK, algo, group_size=2, gamma=1.0)
    torch.testing.assert_close(advantages, _per_token(expected), atol=1e-5, rtol=0)
    torch.testing.assert_close(returns, _per_token([1.0, 3.0, 1.0, 2.0]))


def test_reinforce_pp_returns_are_token_returns():
    advantages, returns = critic_free_advantages(
        REWARDS, MASK, AlgoConfig(estimator="reinforce_pp"), group_size=2, gamma=1.0
    )
    torch.testing.assert_close(
        returns, torch.tensor([[1.0, 1.1], [3.0, 3.0], [1.0, 0.5], [2.0, 0]])
    )
    assert float(advantages[MASK.bool()].mean()) == pytest.approx(0.0, abs=1e-6)


def test_step_three_without_a_critic_needs_no_values_and_passes_the_reference():
    rollout = _rollout([0] * 4, [7, 7, 8, 8])
    scored = {
        "scores": torch.tensor([1.0, 0.0, 0.5, 0.5]),
        "old_logprobs": torch.full((4, 3), -1.0),
        "ref_logprobs": torch.full((4, 3), -1.5),
    }
    ppo = PPOConfig(kl_coef=0.1)
    batch, stats = compute_advantages(
        rollout, scored, 0.1, ppo, AlgoConfig(estimator="rloo"), group_size=2
    )
    # k1 per token 0.5, 3 tokens: every sequence reward is score - 0.1 * 1.5
    assert stats["ppo/kl"] == pytest.approx(1.5)
    torch.testing.assert_close(batch.advantages[:, 0], torch.tensor([1.0, -1.0, 0.0, 0.0]))
    assert torch.equal(batch.ref_logprobs, scored["ref_logprobs"])
    assert torch.equal(batch.old_values, torch.zeros(4, 3))
    assert "ppo/explained_variance" not in stats and math.isfinite(stats["ppo/return_mean"])
