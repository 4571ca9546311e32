"""The sampler/learner log-prob gap check: a round whose samples came from a distribution the
learner does not compute stops before it trains on them.

``rollout/logprob_gap`` (``driver.compute_advantages``) is the mean, over valid response
tokens, of |sampler log-prob - learner old log-prob|. With the same weights and the same
processed distribution it is float error only (~1e-7 in float32 on CPU); a gap well above that
means PPO's ratio would be taken against the wrong policy.
"""

from __future__ import annotations

from rlhf_ray.config.ppo import Config
from rlhf_ray.errors import UserError

# the tolerance when rollout.max_logprob_gap is null, by the policy's parameter dtype
DEFAULT_MAX_GAP = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 5e-2}


class LogprobGapError(UserError, RuntimeError):
    """The rollout's sampler log-probs differ from the learner's by more than the tolerance."""


def gap_tolerance(cfg: Config) -> float:
    """``rollout.max_logprob_gap``, or the default for the policy's dtype when it is null."""
    if cfg.rollout.max_logprob_gap is not None:
        return cfg.rollout.max_logprob_gap
    return DEFAULT_MAX_GAP[cfg.policy.model.dtype]


def check_logprob_gap(gap: float, cfg: Config, round_index: int) -> None:
    """Raise ``LogprobGapError`` naming the likely causes when ``gap`` exceeds the tolerance
    (NaN fails too)."""
    tolerance = gap_tolerance(cfg)
    if gap <= tolerance:
        return
    raise LogprobGapError(
        f"round {round_index}: rollout/logprob_gap {gap:.3g} exceeds the tolerance "
        f"{tolerance:g} (rollout.max_logprob_gap): the samples came from a distribution the "
        "learner's log-probs do not describe, so PPO's ratio would be wrong. Likely causes: "
        "sampling settings applied outside rlhf_ray's sampler (the model's "
        "generation_config.json: repetition_penalty, no_repeat_ngram_size, ...; a patched or "
        "other generation backend), rollout weights that differ from the learner's, or a "
        "low-precision dtype whose float error is larger (then raise rollout.max_logprob_gap)."
    )
