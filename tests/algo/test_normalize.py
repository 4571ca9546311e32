"""Running score moments: hand numbers, then a numpy reference over several rounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rlhf_ray.algo import RunningMoments


def test_running_moments_by_hand():
    moments = RunningMoments()
    assert moments.std == 1.0  # nothing seen yet: normalising leaves the scale alone
    moments.update(torch.tensor([1.0, 2.0, 3.0]))
    assert (moments.count, moments.mean, moments.std) == (3, 2.0, 1.0)
    moments.update(torch.tensor([4.0, 5.0]))  # all five: mean 3, unbiased var 10/4
    assert moments.mean == pytest.approx(3.0) and moments.std == pytest.approx(math.sqrt(2.5))
    torch.testing.assert_close(
        moments.normalize(torch.tensor([3.0, 4.0])), torch.tensor([0.0, 1 / math.sqrt(2.5)])
    )


def test_running_moments_match_numpy_over_rounds_and_survive_a_state_round_trip():
    rng = np.random.default_rng(0)
    rounds = [rng.normal(3.0, 2.0, size=n).astype(np.float32) for n in (4, 7, 1, 5, 8)]
    moments, seen = RunningMoments(), []
    for i, scores in enumerate(rounds):
        moments.update(torch.from_numpy(scores))
        seen.extend(scores.tolist())
        assert moments.mean == pytest.approx(np.mean(seen), abs=1e-9)
        assert moments.std == pytest.approx(np.std(seen, ddof=1), abs=1e-9)
        if i == 2:  # a resume: the state goes through JSON-able numbers and back
            restored = RunningMoments()
            restored.load_state_dict(dict(moments.state_dict()))
            moments = restored
    out = moments.normalize(torch.from_numpy(rounds[-1]))
    expected = (rounds[-1] - np.mean(seen)) / (np.std(seen, ddof=1) + 1e-8)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=1e-6)
