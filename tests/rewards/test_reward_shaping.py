"""Raw scores -> trained-on scores: normalisation modes, the EOS penalty on the normalised
score, clipping; the running statistics against numpy and across a state round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import GPT2Config

from rlhf_ray.config.ppo import ModelSpec, RewardConfig
from rlhf_ray.errors import UserError
from rlhf_ray.rewards.shaping import ScoreShaper, normalize_mode

MODEL = {"function": None, "model": ModelSpec()}
EOS = torch.tensor([True, False, True])


def test_auto_is_running_for_a_reward_model_and_off_for_a_function():
    assert normalize_mode(RewardConfig(**MODEL)) == "running"
    assert normalize_mode(RewardConfig()) == "none"
    assert normalize_mode(RewardConfig(normalize="running")) == "running"
    shaper = ScoreShaper(RewardConfig())  # a function, nothing asked: scores pass unchanged
    scores = torch.tensor([0.2, 5.0, -1.0])
    assert torch.equal(shaper(scores, EOS), scores) and shaper.stats() == {}


def test_the_eos_penalty_is_subtracted_from_the_normalised_score():
    reward = RewardConfig(**MODEL, missing_eos_penalty=0.5)
    out = ScoreShaper(reward)(torch.tensor([1.0, 2.0, 3.0]), EOS)  # mean 2, std 1
    torch.testing.assert_close(out, torch.tensor([-1.0, -0.5, 1.0]))
    plain = ScoreShaper(RewardConfig(missing_eos_penalty=0.5))(torch.tensor([1.0, 2.0, 3.0]), EOS)
    torch.testing.assert_close(plain, torch.tensor([1.0, 1.5, 3.0]))  # off: raw score - 0.5


def test_batch_mode_standardises_each_round_then_clips():
    shaper = ScoreShaper(RewardConfig(normalize="batch", clip=0.5))
    out = shaper(torch.tensor([1.0, 2.0, 3.0]), EOS)
    torch.testing.assert_close(out, torch.tensor([-0.5, 0.0, 0.5]))


def test_running_mode_matches_numpy_over_rounds_and_an_exact_resume():
    rng = np.random.default_rng(1)
    rounds = [rng.normal(5.0, 3.0, size=6).astype(np.float32) for _ in range(5)]
    shaper, seen = ScoreShaper(RewardConfig(**MODEL)), []
    for i, raw in enumerate(rounds):
        out = shaper(torch.from_numpy(raw), torch.ones(6, dtype=torch.bool))
        seen.extend(raw.tolist())
        mean, std = np.mean(seen), np.std(seen, ddof=1)
        np.testing.assert_allclose(out.numpy(), (raw - mean) / (std + 1e-8), rtol=1e-5, atol=1e-6)
        assert shaper.stats() == pytest.approx(
            {"reward/running_mean": mean, "reward/running_std": std}
        )
        if i == 1:  # checkpoint (through JSON, as driver_state.json) and resume
            resumed = ScoreShaper(RewardConfig(**MODEL))
            resumed.load_state_dict(json.loads(json.dumps(shaper.state_dict())))
            shaper = resumed


def test_model_mode_uses_the_reward_models_stored_statistics(tmp_path):
    config = GPT2Config(rlhf_ray_score_mean=2.0, rlhf_ray_score_std=4.0)
    config.save_pretrained(tmp_path / "rm")
    reward = RewardConfig(function=None, model=ModelSpec(path=str(tmp_path / "rm")),
                          normalize="model")  # fmt: skip
    out = ScoreShaper(reward)(torch.tensor([2.0, 6.0, -2.0]), EOS)
    torch.testing.assert_close(out, torch.tensor([0.0, 1.0, -1.0]))
    GPT2Config().save_pretrained(tmp_path / "bare")
    bare = reward.model_copy(update={"model": ModelSpec(path=str(tmp_path / "bare"))})
    with pytest.raises(UserError, match="no stored score statistics"):
        ScoreShaper(bare)
