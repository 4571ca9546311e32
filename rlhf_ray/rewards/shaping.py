"""Raw scores -> the scores PPO trains on: normalise, subtract the missing-EOS penalty, clip.

``reward.normalize`` chooses the statistics (``auto``: ``running`` for a reward model, ``none``
for a reward function; for ``reward.remote``, what the service's ``GET .../info`` says, so that a
reward model behind ``rlhf-ray serve-reward`` is shaped as in process, and ``none`` for a
service without that route):

- ``running``: mean and std of every score seen so far in the run (OpenRLHF, TRL's
  ``RunningMoments``), including this round's; the state is stored in each checkpoint's
  ``driver_state.json`` and restored on resume;
- ``batch``: this round's own mean and std;
- ``model``: the mean and std of the reward model's train-set scores, stored in its
  ``config.json`` as ``rlhf_ray_score_mean`` / ``rlhf_ray_score_std`` by ``rlhf-ray train-rm``
  (for a served model: as its info route reports them);
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
from rlhf_ray.rewards.remote import service_info

STAT_KEYS = ("rlhf_ray_score_mean", "rlhf_ray_score_std")


def normalize_mode(reward: RewardConfig, served: dict[str, Any] | None = None) -> str:
    """``reward.normalize`` with ``auto`` resolved: ``running`` for a model, ``none`` for a
    function, and for a service what its info (``served``) says (``none`` without one)."""
    if reward.normalize != "auto":
        return reward.normalize
    if reward.model is not None:
        return "running"
    return served["normalize"] if served is not None else "none"


def served_stats(served: dict[str, Any] | None, url: str) -> tuple[float, float]:
    """(mean, std) of a served reward model's train-set scores, from its info."""
    mean, std = (served or {}).get("score_mean"), (served or {}).get("score_std")
    if not isinstance(mean, (int, float)) or not isinstance(std, (int, float)):
        raise UserError(
            f"reward.normalize=model: the service {url} reports no score statistics (its "
            "GET .../info route: score_mean, score_std). Use reward.normalize=running instead."
        )
    return float(mean), float(std)


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
        served = None
        if reward.remote is not None and reward.normalize in ("auto", "model"):
            served = service_info(reward.remote)
        self.mode = normalize_mode(reward, served)
        self.moments = RunningMoments()
        self.fixed: tuple[float, float] | None = None
        if self.mode == "model" and reward.remote is not None:
            self.fixed = served_stats(served, reward.remote.url)
        elif self.mode == "model":
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
