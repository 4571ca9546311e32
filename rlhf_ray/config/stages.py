"""Typed configs of the stages around PPO: ``rlhf-ray sft``, ``rlhf-ray train-rm`` and
``rlhf-ray eval``.

Same rules as ``rlhf_ray.config.ppo`` (frozen pydantic, ``extra="forbid"``, a description on every
field, cross-field checks raise) and the same sections where they mean the same thing: the
model (``ModelSpec``), its optimizer (``OptimSpec``), the tokenizer, logging and the cluster.
``load_stage_config`` reads YAML plus dotted overrides with ``config.load_schema``, so errors are
the one-paragraph ``ConfigError`` of ``load_config``.

Each stage's embedded default runs offline in minutes on 2 CPU cores: a tiny GPT-2 preset, the
byte-level tokenizer and the bundled HH-RLHF sample (``builtin:hh-rlhf``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from rlhf_ray.config.ppo import (
    ClusterConfig,
    DataConfig,
    LearnerConfig,
    LoggingConfig,
    ModelSpec,
    OptimSpec,
    RewardConfig,
    RolloutConfig,
    ScorerConfig,
    Section,
    TokenizerConfig,
    load_schema,
    resolve_tokenizer,
)
from rlhf_ray.data.sources import BUILTIN_HH_RLHF

# the files a saved Hugging Face tokenizer leaves in a model directory
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class StageDataBase(Section):
    """Where a stage's examples come from, and its held-out split."""

    path: str = Field(
        BUILTIN_HH_RLHF,
        description="'builtin:hh-rlhf' (300 bundled HH-RLHF pairs), a JSONL/JSON/Parquet/CSV "
        "file, a saved `datasets` directory, or a hub dataset id.",
    )
    eval_path: str | None = Field(
        None, description="Held-out examples in the same format (excludes eval_fraction)."
    )
    eval_fraction: float = Field(
        0.1, ge=0, lt=1, description="Fraction of `path` held out for eval when no eval_path."
    )
    split: str = Field("train", description="Dataset split for hub datasets.")
    max_tokens: int = Field(192, gt=1, description="Tokens per sequence (prompt + reply + EOS).")
    max_prompt_tokens: int = Field(
        128, gt=0, description="Prompts keep their last N tokens (the reply keeps its first)."
    )
    skip_bad_rows: bool = Field(False, description="Skip (and count) rows that do not parse.")

    @model_validator(mode="after")
    def _one_eval_source(self) -> StageDataBase:
        if self.eval_path is not None and self.eval_fraction > 0:
            raise ValueError("set either eval_path or eval_fraction (> 0), not both")
        if self.max_prompt_tokens >= self.max_tokens:
            raise ValueError(
                f"max_prompt_tokens ({self.max_prompt_tokens}) must be below max_tokens "
                f"({self.max_tokens}) to leave room for the reply"
            )
        return self


class SFTDataConfig(StageDataBase):
    """Supervised examples: a conversation and the assistant reply to learn."""

    format: Literal["auto", "hh", "plain", "messages"] = Field(
        "auto",
        description="'hh': HH-RLHF transcripts (the `chosen` side: prompt = every turn before "
        "the final assistant reply); 'plain': `prompt`/`response` rows; 'messages': chat rows "
        "ending with an assistant message; 'auto' picks by the columns present.",
    )


class PreferenceDataConfig(StageDataBase):
    """Preference pairs: a conversation and a chosen and a rejected reply."""

    format: Literal["auto", "hh", "plain"] = Field(
        "auto",
        description="'hh': `chosen`/`rejected` HH-RLHF transcripts; 'plain': `prompt`/`chosen`/"
        "`rejected` rows; 'auto': plain if there is a `prompt` column.",
    )


class StageTrainConfig(Section):
    """The training loop of a stage."""

    epochs: int = Field(2, gt=0, description="Passes over the training examples.")
    batch_size: int = Field(
        16, gt=0, description="Sequences (sft) or pairs (train-rm) per optimizer step, all ranks."
    )
    eval_every: int = Field(
        0, ge=0, description="Evaluate every N steps (0: only at the end of each epoch)."
    )
    eval_train_split: bool = Field(
        True,
        description="At each epoch's end, also score the whole train split with the epoch's "
        "weights (`epoch/train_*`). A forward pass over every training example: on a real "
        "model on CPU about a third of an epoch's time; false skips it.",
    )
    micro_batch_size: int | None = Field(
        None,
        gt=0,
        description="Sequences (sft) or pairs (train-rm) per forward/backward on one rank; "
        "gradients accumulate over a rank's share of batch_size (null: the whole share at once, "
        "no accumulation).",
    )
    max_bad_steps: int = Field(
        3,
        gt=0,
        description="Stop after this many optimizer steps in a row with a non-finite loss or "
        "gradient (each one is skipped and counted as train/skipped_steps).",
    )
    log_every: int = Field(1, gt=0, description="A progress line every N steps.")
    seed: int = Field(0, description="Seed of the held-out split and of the example order.")
    dist_timeout_s: int = Field(600, gt=0, description="torch.distributed collective timeout.")


class StageCheckpointConfig(Section):
    """Periodic checkpoints of a stage (``RUN/checkpoints/step_XXXXXX``): resume and recovery."""

    every: int = Field(
        0, ge=0, description="Checkpoint every K optimizer steps (0: only the final save)."
    )
    keep_last: int = Field(2, ge=1, description="Checkpoints kept on disk.")
    max_restarts: int = Field(
        3, ge=0, description="Restarts of the learner group after a lost rank (needs every)."
    )


class StageConfigBase(Section):
    model: ModelSpec = Field(
        default_factory=ModelSpec, description="Initial weights: an HF directory or a preset."
    )
    optim: OptimSpec = Field(default_factory=OptimSpec, description="Optimizer.")
    learner: LearnerConfig = Field(
        default_factory=LearnerConfig,
        description="The learner group (the section of ppo's `policy` other than its model and "
        "optimizer, which are `model` and `optim` here).",
    )
    tokenizer: TokenizerConfig | None = Field(
        None,
        description="Null: the tokenizer saved in `model.path` if it holds one, else the "
        "built-in byte-level encoding.",
    )
    train: StageTrainConfig = Field(default_factory=StageTrainConfig, description="Loop.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Reporting.")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="Ray resources.")
    checkpoint: StageCheckpointConfig = Field(
        default_factory=StageCheckpointConfig, description="Checkpoints, `--resume`, recovery."
    )

    @model_validator(mode="after")
    def _learner_fits(self) -> StageConfigBase:
        try:  # the rules of every learner group: e.g. engine torch trains float32 weights
            self.learner.check_model(self.model)
        except ValueError as exc:
            raise ValueError(f"learner: {exc}") from None
        ranks = self.learner.num_ranks
        if self.train.batch_size % ranks:
            raise ValueError(
                f"train.batch_size ({self.train.batch_size}) must be divisible by "
                f"learner.num_ranks ({ranks})"
            )
        micro, share = self.train.micro_batch_size, self.train.batch_size // ranks
        if micro is not None and share % micro:
            raise ValueError(
                f"train.micro_batch_size ({micro}) must divide each rank's share of a batch "
                f"(train.batch_size / learner.num_ranks = {share})"
            )
        if self.learner.num_gpus_per_rank == 0 and self.model.dtype == "float16":
            raise ValueError("model.dtype float16 needs GPUs; use bfloat16 on CPU")
        return self


class SFTConfig(StageConfigBase):
    """``rlhf-ray sft``: causal-LM fine-tuning on assistant replies (loss on reply tokens)."""

    data: SFTDataConfig = Field(default_factory=SFTDataConfig, description="SFT examples.")


class RewardModelConfig(StageConfigBase):
    """``rlhf-ray train-rm``: a Bradley-Terry reward model on preference pairs."""

    data: PreferenceDataConfig = Field(
        default_factory=PreferenceDataConfig, description="Preference pairs."
    )


StageConfig = SFTConfig | RewardModelConfig


def stage_tokenizer(cfg: StageConfigBase) -> TokenizerConfig:
    """``tokenizer`` if set; else the tokenizer of ``model.path`` (a hub id, or a local
    directory that holds one); else byte-level."""
    if cfg.tokenizer is not None:
        return cfg.tokenizer
    path = cfg.model.path
    if path is not None:
        local = Path(path).expanduser()
        if not local.exists() or any((local / f).is_file() for f in TOKENIZER_FILES):
            return TokenizerConfig(kind="hf", name_or_path=path)
    return TokenizerConfig(kind="bytes")


def load_sft_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> SFTConfig:
    return load_schema(SFTConfig, path, overrides)


def load_rm_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> RewardModelConfig:
    return load_schema(RewardModelConfig, path, overrides)


class EvalSettings(Section):
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
    phase_timeout_s: float = Field(
        600.0, gt=0, description="Longest wait for a generation or scoring call (on Ray)."
    )
    max_length_gain: float | None = Field(
        0.2,
        gt=0,
        description="Warn when the policy wins (win_rate > 0.5) while its mean response length "
        "is more than this fraction above the baseline's (0.2: 20% longer): the win may be "
        "length bias of the reward rather than better answers. null: no warning.",
    )
    exclude_trained_prompts: bool = Field(
        True,
        description="Drop every prompt of the PPO run the policy comes from (the `config.yaml` "
        "beside or above `policy.path`, e.g. RUN/policy) so eval is on prompts PPO never "
        "saw; none left is an error (give a held-out file). false: evaluate all prompts.",
    )


class EvalConfig(Section):
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
