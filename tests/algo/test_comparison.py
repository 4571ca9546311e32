"""win_rate and sequence_kl on hand-computed examples."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_ray.algo import (
    mean_difference_interval,
    mean_interval,
    prompts_to_exclude_half,
    sequence_kl,
    win_rate,
    win_rate_interval,
)


def test_win_rate_counts_ties_as_half():
    policy = torch.tensor([1.0, 0.5, 2.0, -1.0, 3.0])
    baseline = torch.tensor([0.0, 0.5, 3.0, -2.0, 3.0])
    # wins on rows 0 and 3, ties on rows 1 and 4, a loss on row 2: (2 + 0.5 * 2) / 5
    assert win_rate(policy, baseline) == pytest.approx(0.6)
    assert win_rate(baseline, policy) == pytest.approx(0.4)  # the two rates add up to 1
    assert win_rate(policy, policy) == 0.5


def test_win_rate_refuses_mismatched_rows():
    with pytest.raises(ValueError):
        win_rate(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError):
        win_rate(torch.zeros(0), torch.zeros(0))


def test_sequence_kl_sums_masked_tokens():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.5], [0.5, 0.5, 0.5]]))
    ref = torch.log(torch.tensor([[0.25, 0.25, 0.1], [0.5, 0.5, 0.5]]))
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    k1 = sequence_kl(logp, ref, mask, "k1")
    # row 0: log(0.5/0.25) + log(0.25/0.25) = log 2 (third token masked); row 1: identical
    assert k1.tolist() == pytest.approx([math.log(2), 0.0])
    k3 = sequence_kl(logp, ref, mask, "k3")
    # k3 at token 0: r = log(0.25/0.5) = -log 2, (e^r - 1) - r = -0.5 + log 2
    assert k3.tolist() == pytest.approx([-0.5 + math.log(2), 0.0])


@pytest.mark.parametrize(("wins", "n"), [(32, 64), (38, 64), (0, 10), (10, 10), (7, 12)])
def test_win_rate_interval_is_scipys_wilson_interval(wins, n):
    from scipy.stats import binomtest

    ci = binomtest(wins, n).proportion_ci(0.95, method="wilson")
    assert win_rate_interval(wins / n, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_win_rate_interval_width_at_64_prompts():
    """p = 0.5, n = 64: the standard error is 0.0625 and the interval about +-0.12."""
    low, high = win_rate_interval(0.5, 64)
    assert high - low == pytest.approx(0.2380, abs=1e-4)
    assert prompts_to_exclude_half(0.6) == 93  # 1.96^2 * 0.24 / 0.01
    assert prompts_to_exclude_half(0.5) is None


def test_mean_difference_interval_is_the_paired_t_interval():
    d = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # mean 2.5, sd 1.29099, se 0.645497, t(0.975, 3) = 3.182446 -> +-2.054260
    low, high = mean_difference_interval(d)
    assert (low, high) == pytest.approx((2.5 - 2.054260, 2.5 + 2.054260), abs=1e-5)
    assert mean_difference_interval(torch.tensor([0.5, 0.5])) == (0.5, 0.5)


def test_mean_interval_of_an_accuracy_is_wilsons():
    # 3 right of 4: p = 0.75, n = 4, z = 1.95996; centre (0.75 + z^2/8) / (1 + z^2/4) = 0.6346,
    # half z sqrt(0.75 * 0.25 / 4 + z^2 / 64) / (1 + z^2/4) = 0.3228
    low, high = mean_interval(torch.tensor([1.0, 0.0, 1.0, 1.0]))
    assert (low, high) == pytest.approx((0.3006, 0.9544), abs=1e-4)
    assert (low, high) == win_rate_interval(0.75, 4)


def test_mean_interval_of_other_rewards_is_the_t_interval():
    # mean 2, sample std 1, n = 3: 2 +- t(0.975, 2) * 1 / sqrt(3) = 2 +- 4.3027 / 1.7321
    low, high = mean_interval(torch.tensor([1.0, 2.0, 3.0]))
    assert (low, high) == pytest.approx((2 - 2.4841, 2 + 2.4841), abs=1e-3)
    assert mean_interval(torch.tensor([0.5, 0.5])) == (0.5, 0.5)
    with pytest.raises(ValueError):
        mean_interval(torch.zeros(0))
