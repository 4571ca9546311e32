"""Bradley-Terry and SFT losses on hand-computed examples."""

import math

import pytest
import torch

from rlhf_ray.algo import bradley_terry_loss, sft_loss


def test_bradley_terry_hand_example():
    chosen = torch.tensor([2.0, 0.0, 1.0, -1.0], requires_grad=True)
    rejected = torch.tensor([0.0, 1.0, 1.0, 0.5])
    # margins 2, -1, 0, -1.5; -log sigmoid(m) = log(1 + e^-m):
    #   log(1 + e^-2) = 0.126928, log(1 + e^1) = 1.313262, log 2 = 0.693147,
    #   log(1 + e^1.5) = 1.701413  -> mean 3.834750 / 4 = 0.958688
    loss, stats = bradley_terry_loss(chosen, rejected)
    assert loss.item() == pytest.approx(0.958688, abs=1e-6)
    # wins: 1, 0, tie = 0.5, 0 -> 1.5 / 4
    assert float(stats["accuracy"]) == pytest.approx(0.375)
    assert float(stats["margin"]) == pytest.approx((2 - 1 + 0 - 1.5) / 4)
    # d loss / d chosen_i = -sigmoid(-m_i) / 4
    loss.backward()
    expected = [-1 / (1 + math.exp(m)) / 4 for m in (2.0, -1.0, 0.0, -1.5)]
    assert chosen.grad.tolist() == pytest.approx(expected, abs=1e-6)


def test_bradley_terry_is_log2_at_equal_scores():
    loss, stats = bradley_terry_loss(torch.zeros(3), torch.zeros(3))
    assert loss.item() == pytest.approx(math.log(2))
    assert float(stats["accuracy"]) == 0.5


def test_sft_loss_counts_only_masked_tokens():
    logprobs = torch.tensor([[-9.0, -1.0, -2.0], [-9.0, -9.0, -3.0]])
    mask = torch.tensor([[0, 1, 1], [0, 0, 1]])
    # (1 + 2 + 3) / 3 tokens; the -9 prompt positions do not count
    assert sft_loss(logprobs, mask).item() == pytest.approx(2.0)
