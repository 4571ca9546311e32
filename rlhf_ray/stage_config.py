"""Typed configs of the stages around PPO: ``rlhf-ray eval``.

Same rules as ``rlhf_ray.config`` (frozen pydantic, ``extra="forbid"``, a description on every
field, cross-field checks raise) and the same sections where they mean the same thing: models
(``ModelSpec``), the reward (``RewardConfig``), prompts (``DataConfig``), sampling and the
rollout pool (``RolloutConfig``), the tokenizer, logging and the cluster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from rlhf_ray.config import (
    ClusterConfig,
    DataConfig,
    LoggingConfig,
    ModelSpec,
    RewardConfig,
    RolloutConfig,
    ScorerConfig,
    TokenizerConfig,
    _Section,
    load_schema,
    resolve_tokenizer,
)


class EvalSettings(_Section):
    """What is compared and reported."""

    num_prompts: int | None = Field(
        64, gt=0, description="Evaluate the first N prompts of `data.prompts` (null: all)."
    )
    seed: int = Field(
        0, description="Sampling seed; both policies sample each prompt with the same seed."
    )
    kl_estimator: Literal["k1", "k3"] = Field(
        "k1", description="Per-token estimator summed into `kl_to_baseline` (see algo.kl)."
    )
    table_rows: int = Field(8, ge=0, description="Sample rows shown in eval.md.")


class EvalConfig(_Section):
    """``rlhf-ray eval``: a tuned policy against its baseline on held-out prompts, scored by the
    reward. Both generate with the rollout pool; ``rollout.batch_size`` prompts per step."""

    policy: ModelSpec = Field(
        default_factory=ModelSpec, description="The tuned policy (`--policy DIR`: policy.path)."
    )
    baseline: ModelSpec = Field(
        default_factory=ModelSpec,
        description="What it is compared with, e.g. the SFT model (`--baseline DIR`).",
    )
    reward: RewardConfig = Field(
        default_factory=RewardConfig,
        description="The judge (`--reward-model DIR`: reward.model.path).",
    )
    tokenizer: TokenizerConfig = Field(
        default_factory=TokenizerConfig,
        description="The policies' tokenizer ('auto': the policy directory's own).",
    )
    data: DataConfig = Field(default_factory=DataConfig, description="Held-out prompts.")
    rollout: RolloutConfig = Field(
        default_factory=lambda: RolloutConfig(num_workers=1),
        description="Sampling, and the rollout pool of EACH policy (num_workers generators).",
    )
    scorer: ScorerConfig = Field(
        default_factory=ScorerConfig,
        description="Resources of each log-prob scorer (one for the policy, one for the baseline).",
    )
    eval: EvalSettings = Field(default_factory=EvalSettings, description="Comparison.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Reporting.")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="Ray resources.")


def eval_tokenizer(cfg: EvalConfig) -> TokenizerConfig:
    """The tokenizer of both policies, resolved (``tokenizer``, else the policy directory's)."""
    return resolve_tokenizer(cfg.tokenizer, cfg.policy.path)


def load_eval_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> EvalConfig:
    return load_schema(EvalConfig, path, overrides)
