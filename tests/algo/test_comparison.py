"""win_rate and sequence_kl on hand-computed examples."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_ray.algo import sequence_kl, win_rate


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
