"""Raw scores -> the scores PPO trains on: normalise, subtract the missing-EOS penalty, clip.

``reward.normalize`` chooses the statistics (``auto``: ``running`` for a reward model, ``none``
for a reward function):

- ``running``: mean and std of every score seen so far in the run (OpenRLHF, TRL's
  ``RunningMoments``), including this round's; the state is stored in each checkpoint's
  ``driver_state.json`` and restored on resume;
- ``batch``: this round's own mean and std;
- ``model``: the mean and std of the reward model's train-set scores, stored in its
  ``config.json`` as ``rlhf_ray_score_mean`` / ``rlhf_ray_score_std`` by ``rlhf-ray train-rm``;
- ``none`` (not ``off``, which YAML reads as false).

The missing-EOS penalty is subtracted after normalising, so it is measured in standard
deviations of the score whatever the reward model's scale.
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf_ray.algo import RunningMoments, apply_missing_eos_penalty, standardize
from rlhf_ray.config.ppo import ModelSpec, RewardConfig
from rlhf_ray.errors import UserError

STAT_KEYS = ("rlhf_ray_score_mean", "rlhf_ray_score_std")


def normalize_mode(reward: RewardConfig) -> str:
    """``reward.normalize`` with ``auto`` resolved: ``running`` for a model, ``none`` for a
    function."""
    if reward.normalize != "auto":
        return reward.normalize
    return "running" if reward.model is not None else "none"


def model_score_stats(path: str) -> tuple[float, float]:
    """(mean, std) of a reward model's train-set scores, from its ``config.json``."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"reward.normalize=model: cannot read the config of {path}: {exc}"
        ) from None
    mean, std = (getattr(config, key, None) for key in STAT_KEYS)
    if mean is None or std is None:
        raise UserError(
            f"reward.normalize=model: the reward model at {path} has no stored score statistics "
            f"({' / '.join(STAT_KEYS)} in config.json; `rlhf-ray train-rm` writes them). "
            "Use reward.normalize=running instead."
        )
    return float(mean), float(std)


class ScoreShaper:
    """Turns raw scores ``(B,)`` into the scores of the KL-penalised reward, round by round."""

    def __init__(self, reward: RewardConfig):
        self.reward = reward
        self.mode = normalize_mode(reward)
        self.moments = RunningMoments()
        self.fixed: tuple[float, float] | None = None
        if self.mode == "model":
            one = reward.model if isinstance(reward.model, ModelSpec) else None  # not a list
            path = one.path if one is not None else None
            if path is None:
                raise UserError("reward.normalize=model needs reward.model.path (a saved model)")
            self.fixed = model_score_stats(path)

    def __call__(self, scores: torch.Tensor, has_eos: torch.Tensor) -> torch.Tensor:
        if self.mode == "running":
            self.moments.update(scores)
            scores = self.moments.normalize(scores)
        elif self.mode == "batch" and len(scores) > 1:
            scores = standardize(scores, float(scores.mean()), float(scores.std()))
        elif self.mode == "model":
            assert self.fixed is not None
            scores = standardize(scores, *self.fixed)
        scores = apply_missing_eos_penalty(scores, has_eos, self.reward.missing_eos_penalty)
        if self.reward.clip is not None:
            scores = scores.clamp(-self.reward.clip, self.reward.clip)
        return scores

    def stats(self) -> dict[str, float]:
        """The statistics in use (running mode), for the round's metrics."""
        if self.mode != "running":
            return {}
        return {"reward/running_mean": self.moments.mean, "reward/running_std": self.moments.std}

    def state_dict(self) -> dict[str, Any]:
        return {"moments": self.moments.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.moments.load_state_dict(state["moments"])
