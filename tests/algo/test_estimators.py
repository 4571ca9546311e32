"""Critic-free estimators against hand-computed tensors: ragged masks, equal-score groups."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_ray.algo import (
    discounted_returns,
    grpo_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
    sequence_rewards,
)

# two groups of 3 rows; group 1's scores are all equal. Ragged response masks.
SCORES = torch.tensor([0.0, 2.0, 4.0, 4.0, 4.0, 4.0])
MASK = torch.tensor(
    [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.long
)


def _expected(per_row: list[float]) -> torch.Tensor:
    return torch.tensor(per_row)[:, None] * MASK.float()


def test_grpo_divides_by_the_group_std():
    # group 0: mean 2, deviations (-2, 0, 2), unbiased std sqrt((4 + 0 + 4) / 2) = 2
    adv = grpo_advantages(SCORES, MASK, group_size=3, norm_std=True, eps=1e-6)
    s = 2 + 1e-6
    torch.testing.assert_close(adv, _expected([-2 / s, 0, 2 / s, 0, 0, 0]))


def test_grpo_without_std_is_the_centred_score():
    adv = grpo_advantages(SCORES, MASK, group_size=3, norm_std=False)
    torch.testing.assert_close(adv, _expected([-2, 0, 2, 0, 0, 0]))


def test_grpo_group_of_equal_scores_gives_zero_not_nan():
    adv = grpo_advantages(torch.full((4,), 0.7), torch.ones(4, 2), group_size=2, norm_std=True)
    assert torch.equal(adv, torch.zeros(4, 2))


def test_rloo_subtracts_the_mean_of_the_other_samples():
    # group 0: 0 - (2+4)/2 = -3, 2 - (0+4)/2 = 0, 4 - (0+2)/2 = 3; group 1: 4 - 4 = 0
    adv = rloo_advantages(SCORES, MASK, group_size=3)
    torch.testing.assert_close(adv, _expected([-3, 0, 3, 0, 0, 0]))


def test_group_estimators_use_contiguous_rows_not_prompt_values():
    # groups of 2: (1, 3) and (5, 5): the rows, not which prompt they came from, define a group
    scores, mask = torch.tensor([1.0, 3.0, 5.0, 5.0]), torch.ones(4, 1)
    torch.testing.assert_close(
        rloo_advantages(scores, mask, 2), torch.tensor([[-2.0], [2.0], [0.0], [0.0]])
    )
    grpo = grpo_advantages(scores, mask, 2, norm_std=False)
    torch.testing.assert_close(grpo, torch.tensor([[-1.0], [1.0], [0.0], [0.0]]))


@pytest.mark.parametrize("fn", [rloo_advantages, grpo_advantages])
def test_group_estimators_refuse_groups_that_do_not_fit(fn):
    with pytest.raises(ValueError, match="groups of 4"):
        fn(torch.zeros(6), torch.ones(6, 2), 4)
    with pytest.raises(ValueError, match="at least 2"):
        fn(torch.zeros(6), torch.ones(6, 2), 1)


# REINFORCE++: token rewards (KL penalties and the score at the last valid token); the padded
# position holds garbage that must be ignored.
TOKEN_REWARDS = torch.tensor([[-0.1, 1.0, 5.0], [0.5, 5.0, 5.0]])
TOKEN_MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


def test_discounted_returns_by_hand():
    torch.testing.assert_close(
        discounted_returns(TOKEN_REWARDS, TOKEN_MASK, 1.0),
        torch.tensor([[0.9, 1.0, 0], [0.5, 0, 0]]),
    )
    # gamma 0.5: -0.1 + 0.5 * 1.0 = 0.4
    torch.testing.assert_close(
        discounted_returns(TOKEN_REWARDS, TOKEN_MASK, 0.5),
        torch.tensor([[0.4, 1.0, 0], [0.5, 0, 0]]),
    )


def test_reinforce_pp_whitens_returns_over_the_whole_batch():
    adv, returns = reinforce_pp_advantages(TOKEN_REWARDS, TOKEN_MASK, gamma=1.0, eps=0.0)
    # valid returns 0.9, 1.0, 0.5: mean 0.8, unbiased var (0.01 + 0.04 + 0.09) / 2 = 0.07
    sd = math.sqrt(0.07)
    torch.testing.assert_close(adv, torch.tensor([[0.1 / sd, 0.2 / sd, 0], [-0.3 / sd, 0, 0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.9, 1.0, 0], [0.5, 0, 0]]))


def test_reinforce_pp_with_equal_returns_gives_zero_not_nan():
    rewards = torch.tensor([[0.0, 0.3], [0.3, 9.0]])
    adv, _ = reinforce_pp_advantages(rewards, torch.tensor([[1, 1], [1, 0]]))
    assert torch.equal(adv, torch.zeros(2, 2))


def test_sequence_rewards_sum_the_valid_token_rewards():
    torch.testing.assert_close(
        sequence_rewards(TOKEN_REWARDS, TOKEN_MASK), torch.tensor([0.9, 0.5])
    )
