"""The one typed config of rlhf_ray.

A frozen pydantic schema with ``extra="forbid"``, loaded from YAML and overridden by dotted
``key=value`` arguments (``rollout.num_workers=3``). Cross-field rules raise; nothing is silently
rewritten. ``load_config`` turns any validation failure into a ``ConfigError`` whose message is one
paragraph naming the offending field, which the CLI prints without a traceback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rlhf_ray.errors import UserError


class ConfigError(UserError, ValueError):
    """A config that cannot be used; the message names the field and says why."""


class Section(BaseModel):
    """A config section: frozen, unknown keys refused (also the stage configs' base)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


_Section = Section  # the sections below still say _Section; renamed once parallel edits merge


_Schema = TypeVar("_Schema", bound=BaseModel)


class ModelSpec(_Section):
    """Where a model's weights come from: a tiny preset built from a config, or an HF path."""

    path: str | None = Field(
        None,
        description="Local Hugging Face model directory or hub id (hub needs network). "
        "When set, the preset settings below are not used.",
    )
    preset: Literal["gpt2-tiny", "llama-tiny"] = Field(
        "gpt2-tiny",
        description="Tiny architecture built from a config with random weights (when no path).",
    )
    hidden_size: int = Field(64, gt=0, description="Preset only: hidden size.")
    num_layers: int = Field(2, gt=0, description="Preset only: number of transformer layers.")
    num_heads: int = Field(4, gt=0, description="Preset only: attention heads.")
    max_positions: int = Field(256, gt=0, description="Preset only: maximum sequence length.")
    init_seed: int = Field(0, description="Preset only: seed of the random initialisation.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Parameter dtype (float16 needs GPUs)."
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelSpec:
        if self.path is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        return self


class OptimSpec(_Section):
    """AdamW settings of a trainable model, and its learning-rate schedule.

    Defaults follow the PPO implementation-detail studies (OpenAI's lm-human-preferences, as
    re-read by Huang et al.): Adam with eps 1e-5 and betas (0.9, 0.999), no weight decay.
    """

    lr: float = Field(1e-3, gt=0, description="AdamW peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    eps: float = Field(1e-5, gt=0, description="AdamW epsilon (1e-5 as in the PPO studies).")
    grad_clip: float = Field(1.0, gt=0, description="Global gradient-norm clip.")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant",
        description="After warmup: keep `lr`, or decay it linearly / by a cosine to "
        "`min_lr_ratio * lr` at the last optimizer step.",
    )
    warmup_steps: int = Field(
        0, ge=0, description="Optimizer steps of linear warmup from lr/warmup_steps up to lr."
    )
    min_lr_ratio: float = Field(
        0.0, ge=0, le=1, description="Final learning rate of a decay, as a fraction of `lr`."
    )
    decay_steps: int | None = Field(
        None,
        gt=0,
        description="Optimizer steps the schedule spans (null: every optimizer step of the "
        "run, train.rounds x ppo.epochs x minibatches per round).",
    )


class PolicyConfig(_Section):
    """The trained policy: its model, optimizer and the learner group that trains it."""

    model: ModelSpec = Field(default_factory=ModelSpec, description="Policy weights source.")
    optim: OptimSpec = Field(default_factory=OptimSpec, description="Optimizer.")
    engine: Literal["deepspeed", "torch"] = Field(
        "deepspeed",
        description="Training engine: DeepSpeed ZeRO, or plain torch AdamW (one rank only).",
    )
    num_ranks: int = Field(2, ge=1, description="Data-parallel learner ranks (one actor each).")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    num_gpus_per_rank: float = Field(0.0, ge=0, description="GPUs per rank (fractions colocate).")
    num_cpus_per_rank: float = Field(0.25, gt=0, description="CPUs per rank.")
    offload_optimizer: bool = Field(False, description="ZeRO optimizer offload to CPU.")
    offload_params: bool = Field(
        False, description="ZeRO-3 parameter offload to CPU memory (zero_stage 3 only)."
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each layer's activations in the backward pass instead of "
        "keeping them (less memory, ~30% more compute).",
    )
    score_micro_batch_size: int = Field(
        16, gt=0, description="Rows per forward when this learner scores a round (no grad)."
    )

    @model_validator(mode="after")
    def _engine_ranks(self) -> PolicyConfig:
        if self.engine == "torch" and self.num_ranks != 1:
            raise ValueError("engine 'torch' trains on one rank: set num_ranks=1 or use deepspeed")
        if self.engine == "torch" and self.model.dtype != "float32":
            raise ValueError(
                f"engine 'torch' with model.dtype {self.model.dtype} would run AdamW on "
                "half-precision weights with no fp32 master copy (small updates round away); "
                "use model.dtype float32, or engine deepspeed (fp32 master weights)"
            )
        if self.offload_params and (self.engine != "deepspeed" or self.zero_stage != 3):
            raise ValueError("offload_params needs engine deepspeed with zero_stage 3")
        if self.num_ranks > 1 and 0 < self.num_gpus_per_rank < 1:
            raise ValueError(
                f"num_gpus_per_rank {self.num_gpus_per_rank:g} < 1 with {self.num_ranks} ranks "
                "would put ranks of one NCCL group on the same GPU, which NCCL refuses; "
                "colocate different roles on a GPU instead, or use num_ranks=1"
            )
        return self


class ValueConfig(PolicyConfig):
    """The critic: an LM backbone with a scalar head, trained like the policy."""

    num_ranks: int = Field(1, ge=1, description="Data-parallel critic ranks.")
    init_from_reward: bool = Field(
        False, description="Initialise the critic from the reward model's weights."
    )


class ScorerConfig(_Section):
    """Resources of a frozen scoring role: data-parallel replicas that split each batch."""

    num_gpus: float = Field(0.0, ge=0, description="GPUs for each replica.")
    num_cpus: float = Field(0.25, gt=0, description="CPUs for each replica.")
    num_replicas: int = Field(
        1, ge=1, description="Data-parallel replicas (actors <role>-0, <role>-1, ...)."
    )
    score_micro_batch_size: int = Field(16, gt=0, description="Rows per scoring forward.")


class ReferenceConfig(ScorerConfig):
    """The frozen reference policy (a copy of the initial policy unless `model` is set)."""

    model: ModelSpec | None = Field(None, description="Null: the initial policy's weights.")


DEFAULT_REWARD_FUNCTION = "rlhf_ray.rewards:lowercase_fraction"


class RewardConfig(ScorerConfig):
    """Where the scalar score of a response comes from: a function or a reward model."""

    function: str | None = Field(
        None,
        description="'package.module:callable' called as fn(prompts, responses) -> list[float]. "
        f"Unset: {DEFAULT_REWARD_FUNCTION!r} when no `model` is given, else the model.",
    )
    model: ModelSpec | None = Field(
        None,
        description="Reward model (sequence-classification checkpoint, e.g. RUN/reward_model of "
        "`rlhf-ray train-rm`); replaces the default function. A directory holding its own "
        "tokenizer is fed the rollout text encoded with that tokenizer.",
    )
    normalize: Literal["auto", "running", "batch", "model", "none"] = Field(
        "auto",
        description="Standardise scores with: 'running' mean/std of every score so far (kept in "
        "checkpoints), 'batch' the round's own, 'model' the reward model's stored train-set "
        "statistics, or 'none'. 'auto': running for a reward model, none for a function.",
    )
    append_eos: bool = Field(
        True,
        description="A reward model reads every response as a finished reply, as "
        "`rlhf-ray train-rm` trained it (prompt + reply + EOS): a response that "
        "rollout.max_new_tokens cut before it sampled EOS is scored with the reward model's EOS "
        "appended (to what the model reads, not to the sample). false: read it at its last "
        "sampled token, where such a model was never trained. missing_eos_penalty still "
        "applies. No effect on a reward function.",
    )
    clip: float | None = Field(
        None, gt=0, description="Clip the shaped scores (after the penalty) to [-clip, clip]."
    )
    missing_eos_penalty: float | None = Field(
        None,
        ge=0,
        description="Subtracted from the (normalised) score of a response that never emits EOS, "
        "as TRL does: score - penalty, so a penalty of 1 costs one standard deviation when "
        "scores are normalised (null: off).",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_function(cls, data: Any) -> Any:
        """An unset `function` means the built-in one only when no `model` is given."""
        if isinstance(data, dict) and "function" not in data and data.get("model") is None:
            return {**data, "function": DEFAULT_REWARD_FUNCTION}
        return data

    @model_validator(mode="after")
    def _one_source(self) -> RewardConfig:
        if (self.function is None) == (self.model is None):
            raise ValueError(
                "set exactly one of `function` and `model` (set function=null to use the model)"
            )
        if self.normalize == "model" and (self.model is None or self.model.path is None):
            raise ValueError(
                "normalize 'model' reads the statistics stored with a saved reward model: "
                "set model.path, or use normalize 'running'"
            )
        if self.function is not None and ":" not in self.function:
            raise ValueError(f"function {self.function!r} must look like 'package.module:callable'")
        return self


class TokenizerConfig(_Section):
    """The tokenizer of the policy (shared by the policy, reference, critic and rollout roles;
    a reward model directory with its own tokenizer uses that one)."""

    kind: Literal["auto", "bytes", "tiktoken", "hf"] = Field(
        "auto",
        description="'auto': the policy model directory's own tokenizer if it holds one "
        "(e.g. RUN/model of `rlhf-ray sft`), else 'bytes'; 'bytes': built-in offline byte-level "
        "encoding; 'tiktoken': an encoding name or local .tiktoken file; 'hf': a Hugging Face "
        "tokenizer path or hub id.",
    )
    name_or_path: str | None = Field(None, description="Encoding name, file or HF path.")

    @model_validator(mode="after")
    def _needs_name(self) -> TokenizerConfig:
        if self.kind in ("tiktoken", "hf") and not self.name_or_path:
            raise ValueError(f"kind {self.kind!r} needs `name_or_path`")
        if self.kind in ("bytes", "auto") and self.name_or_path:
            raise ValueError(f"kind {self.kind!r} takes no `name_or_path`")
        return self


class DataConfig(_Section):
    """The prompts PPO trains on."""

    prompts: str = Field(
        "builtin",
        description="'builtin' (bundled prompts), a JSONL/JSON/Parquet/CSV file, a saved "
        "`datasets` directory, or a hub dataset id.",
    )
    prompt_field: str = Field("prompt", description="Column holding the prompt text.")
    format: Literal["auto", "plain", "hh"] = Field(
        "auto", description="'hh': HH-RLHF transcripts (prompt = shared prefix)."
    )
    split: str = Field("train", description="Dataset split for hub datasets.")
    max_prompt_tokens: int = Field(48, gt=0, description="Prompts keep their last N tokens.")
    chat_template: bool = Field(False, description="Wrap each prompt with the chat template.")
    on_bad_row: Literal["error", "skip"] = Field(
        "error",
        description="A malformed row (not JSON, not UTF-8, prompt missing or empty): 'error' "
        "stops before any actor starts, naming file and line; 'skip' drops it and counts it "
        "(`data/skipped_rows`).",
    )


class RolloutConfig(_Section):
    """Sampling and the rollout generator pool."""

    batch_size: int = Field(32, gt=0, description="Prompts per round.")
    samples_per_prompt: int = Field(
        1,
        ge=1,
        description="Responses sampled per prompt (n): a round has batch_size * n samples, "
        "each prompt's n samples in consecutive rows (a group, for grpo/rloo baselines).",
    )
    num_workers: int = Field(2, ge=1, description="Rollout generator actors.")
    max_new_tokens: int = Field(16, gt=0, description="Tokens sampled per response.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (also in logprobs).")
    top_k: int = Field(
        0,
        ge=0,
        description="Top-k sampling (0: off). The sampler records, and the policy's old and new "
        "log-probs and entropy use, this filtered distribution; the reference does not.",
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling (1: off).")
    micro_batch_size: int = Field(
        8,
        gt=0,
        description="Rows generated together (one `generate` call). The round's rows are cut "
        "into micro-batches counted from its first row and dealt whole to the workers, so a "
        "row is computed beside the same rows, and sampled identically, whatever "
        "rollout.num_workers is.",
    )
    num_gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per rollout worker.")
    num_cpus_per_worker: float = Field(0.25, gt=0, description="CPUs per rollout worker.")


class PPOConfig(_Section):
    """The PPO update and advantage estimation."""

    epochs: int = Field(4, gt=0, description="Passes over each round's batch.")
    minibatch_size: int = Field(16, gt=0, description="Samples per optimizer step (all ranks).")
    clip_eps: float = Field(0.2, gt=0, description="Policy ratio clip range.")
    value_clip_eps: float = Field(0.2, gt=0, description="Value clip range.")
    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    kl_coef: float = Field(0.02, ge=0, description="Initial KL penalty coefficient (beta).")
    kl_estimator: Literal["k1", "k3"] = Field("k1", description="Per-token KL estimator.")
    adaptive_kl: bool = Field(False, description="Adapt beta towards `kl_target`.")
    kl_target: float = Field(6.0, gt=0, description="Adaptive KL target (nats per sequence).")
    kl_horizon: int = Field(10000, gt=0, description="Adaptive KL horizon (samples).")
    kl_in_loss: Literal["k3", "k2"] | None = Field(
        None,
        description="Add KL(policy || reference) to the policy loss with this estimator, "
        "weighted by kl_loss_coef (GRPO's way); null: off. Excludes a nonzero kl_coef.",
    )
    kl_loss_coef: float = Field(0.001, ge=0, description="Weight of the KL loss (kl_in_loss).")
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"] = Field(
        "token_mean",
        description="How per-token policy losses become one loss: mean over all tokens, mean "
        "over sequences of per-sequence token means (GRPO) or of token sums (Dr. GRPO).",
    )
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus coefficient.")
    whiten_advantages: bool = Field(
        True, description="Whiten GAE advantages over valid tokens (estimator gae only)."
    )
    critic_warmup_rounds: int = Field(
        0,
        ge=0,
        description="For the first N rounds only the value model is updated, not the policy "
        "(metric `ppo/critic_warmup` is 1 then): the usual remedy when the critic starts from "
        "a reward model or a fresh head.",
    )
    micro_batch_size: int | None = Field(
        None,
        gt=0,
        description="Rows per forward/backward on one rank; gradients accumulate over a "
        "rank's share of a minibatch (null: the whole share at once, no accumulation).",
    )


class AlgoConfig(_Section):
    """The advantage estimator: PPO with a critic, or a critic-free one."""

    estimator: Literal["gae", "grpo", "rloo", "reinforce_pp"] = Field(
        "gae",
        description="'gae': PPO with a learned critic; critic-free: 'grpo' (group mean, "
        "optionally std), 'rloo' (leave-one-out group mean), 'reinforce_pp' (REINFORCE++: "
        "returns normalised over the global batch). grpo/rloo need samples_per_prompt >= 2.",
    )
    grpo_norm_std: bool = Field(
        True, description="grpo: also divide by the group's reward std (Dr. GRPO: false)."
    )


class TrainConfig(_Section):
    """The outer loop."""

    rounds: int = Field(30, gt=0, description="PPO rounds (generate, score, update, sync).")
    seed: int = Field(0, description="Seed of prompt order, sampling and minibatch shuffles.")
    dist_timeout_s: int = Field(600, gt=0, description="torch.distributed collective timeout.")
    phase_timeout_s: float = Field(
        600.0,
        gt=0,
        description="Longest wait for any actor call of a phase. A rollout, reference or reward "
        "actor past it is replaced and its work redone; a learner past it is treated as lost.",
    )
    max_restarts: int = Field(
        2,
        ge=0,
        description="Times the learner groups are rebuilt from the last checkpoint after a rank "
        "dies or hangs (`train/learner_restarts`); needs checkpoint.every.",
    )
    max_bad_steps: int = Field(
        3,
        gt=0,
        description="Non-finite losses skipped in a row (`ppo/skipped_steps`) before the run "
        "stops with an error.",
    )


class CheckpointConfig(_Section):
    """Periodic checkpoints of the run."""

    every: int = Field(0, ge=0, description="Checkpoint every K rounds (0: only the final save).")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept on disk.")


class LoggingConfig(_Section):
    """What a run reports. JSONL (``metrics.jsonl``) is always written; the other sinks are
    optional extras (``pip install 'rlhf-ray[tensorboard]'`` / ``'rlhf-ray[wandb]'``), and a run
    with a sink switched on whose package is missing stops before anything starts."""

    progress: bool = Field(
        True,
        description="Show progress: a live display on a terminal, otherwise one plain line "
        "per round (CI, `ray job logs`).",
    )
    tensorboard: bool = Field(False, description="Also write TensorBoard scalars to RUN/tb.")
    wandb: bool = Field(False, description="Also log to Weights & Biases.")
    wandb_project: str = Field("rlhf_ray", min_length=1, description="W&B project name.")
    wandb_mode: Literal["auto", "online", "offline"] = Field(
        "auto",
        description="'auto': online when W&B credentials are set and its server is reachable, "
        "else offline (files under the W&B dir, `wandb sync` them later).",
    )
    wandb_dir: str | None = Field(
        None, description="Where W&B writes its files (null: the run dir, so RUN/wandb/)."
    )
    dump_rollouts_every: int = Field(
        0,
        ge=0,
        description="Every K rounds (round % K == 0) write RUN/rollouts/round_XXXXXX.jsonl "
        "(one row per sample) and the round's PPO batch (.safetensors, for `rlhf-ray replay`); "
        "0: off.",
    )


class SyncConfig(_Section):
    """How the policy's weights reach the rollout workers after each update, and the check
    that they arrived intact."""

    bucket_mb: float = Field(
        256.0,
        gt=0,
        description="Weights move in buckets of about this many MB: gathered, sent and loaded "
        "one bucket at a time (a tensor larger than a bucket travels alone).",
    )

    max_logprob_diff: float = Field(
        1e-2,
        gt=0,
        description="After each sync one rollout worker and the policy learner score a fixed "
        "probe sequence; the run stops if their log-probs differ by more than this "
        "(logged as sync/logprob_max_abs_diff).",
    )


class NodeSpec(_Section):
    """One kind of node of a cluster described offline (for `rlhf-ray plan`)."""

    cpus: float = Field(..., ge=0, description="CPUs per node.")
    gpus: float = Field(0.0, ge=0, description="GPUs per node.")
    count: int = Field(1, ge=1, description="Nodes of this kind.")
    gpu_memory_gb: float | None = Field(
        None, gt=0, description="Memory of each GPU in GB (null: the memory check is skipped)."
    )


class ClusterConfig(_Section):
    """How Ray is reached and how long actors may wait for resources."""

    nodes: list[NodeSpec] | None = Field(
        None,
        description="The target cluster, for planning without connecting to it (null: the "
        "cluster at --address/RAY_ADDRESS, else this machine).",
    )

    num_cpus: int | None = Field(
        None, gt=0, description="CPUs of a locally started Ray (null: all of this machine)."
    )
    namespace: str = Field(
        "rlhf_ray",
        min_length=1,
        description="Ray namespace of the run's named actors (one run per namespace at a time).",
    )
    actor_start_timeout_s: float = Field(
        180.0, gt=0, description="Give up (clearly) if actors stay pending this long."
    )
    learner_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each learner rank also requests, to pin the learner "
        "groups to nodes that offer them (e.g. {learner_node: 0.01}).",
    )
    spread: bool = Field(
        True,
        description="Spread rollout workers and scorers over the cluster's nodes (Ray SPREAD "
        "scheduling), so that losing one node loses few of them.",
    )


class Config(_Section):
    """A whole rlhf_ray PPO run."""

    policy: PolicyConfig = Field(default_factory=PolicyConfig, description="Trained policy.")
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig, description="Reference.")
    value: ValueConfig = Field(default_factory=ValueConfig, description="Critic.")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="Reward source.")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="Tokenizer.")
    data: DataConfig = Field(default_factory=DataConfig, description="Prompt data.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Sampling.")
    ppo: PPOConfig = Field(default_factory=PPOConfig, description="PPO update.")
    algo: AlgoConfig = Field(default_factory=AlgoConfig, description="Advantage estimator.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Outer loop.")
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig, description="Checkpoints."
    )
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Reporting.")
    sync: SyncConfig = Field(default_factory=SyncConfig, description="Weight sync checks.")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="Ray resources.")

    @model_validator(mode="after")
    def _batch_sizes(self) -> Config:
        batch, mini, n = (
            self.rollout.batch_size,
            self.ppo.minibatch_size,
            self.rollout.samples_per_prompt,
        )
        if (batch * n) % mini:
            raise ValueError(
                f"ppo.minibatch_size ({mini}) must divide the samples of a round, "
                f"rollout.batch_size * rollout.samples_per_prompt ({batch} * {n})"
            )
        learners = (("policy", self.policy), ("value", self.value))[: 1 + has_critic(self)]
        for name, role in learners:
            if mini % role.num_ranks:
                raise ValueError(
                    f"ppo.minibatch_size ({mini}) must be divisible by {name}.num_ranks "
                    f"({role.num_ranks})"
                )
            micro = self.ppo.micro_batch_size
            if micro is not None and (mini // role.num_ranks) % micro:
                raise ValueError(
                    f"ppo.micro_batch_size ({micro}) must divide each {name} rank's share of a "
                    f"minibatch (ppo.minibatch_size / {name}.num_ranks = {mini // role.num_ranks})"
                )
            if role.num_gpus_per_rank == 0 and role.model.dtype == "float16":
                raise ValueError(f"{name}.model.dtype float16 needs GPUs; use bfloat16 on CPU")
        if has_critic(self) and self.value.init_from_reward and self.reward.model is None:
            raise ValueError("value.init_from_reward needs reward.model")
        return self

    @model_validator(mode="after")
    def _estimator(self) -> Config:
        estimator, n = self.algo.estimator, self.rollout.samples_per_prompt
        if estimator in ("grpo", "rloo") and n < 2:
            raise ValueError(
                f"algo.estimator {estimator} compares the samples of a prompt: set "
                f"rollout.samples_per_prompt to 2 or more (got {n})"
            )
        if self.ppo.kl_in_loss is not None and self.ppo.kl_coef > 0:
            raise ValueError(
                f"ppo.kl_in_loss ({self.ppo.kl_in_loss}) and ppo.kl_coef ({self.ppo.kl_coef:g}) "
                "would add the same KL penalty twice, in the loss and in the reward: set "
                "ppo.kl_coef=0 to keep it in the loss, or ppo.kl_in_loss=null to keep it in "
                "the reward"
            )
        if self.ppo.kl_in_loss is not None and self.ppo.adaptive_kl:
            raise ValueError("ppo.adaptive_kl adapts the KL-in-reward coefficient, not kl_in_loss")
        return self


def has_critic(cfg: Config) -> bool:
    """Whether the run has a value group: only the ``gae`` estimator learns a critic."""
    return cfg.algo.estimator == "gae"


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def model_tokenizer(model_path: str | None) -> TokenizerConfig | None:
    """The tokenizer a model comes with: a local directory's saved Hugging Face tokenizer, or
    (a path that is not local: a hub id) the hub repo's; None for a directory without one."""
    if model_path is None:
        return None
    path = os.path.expanduser(model_path)
    if not os.path.exists(path) or any(
        os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES
    ):
        return TokenizerConfig(kind="hf", name_or_path=path)
    return None


def resolve_tokenizer(tok: TokenizerConfig, model_path: str | None) -> TokenizerConfig:
    """``tok`` itself unless its kind is 'auto'; then the tokenizer the model at ``model_path``
    comes with, else the built-in bytes."""
    if tok.kind != "auto":
        return tok
    return model_tokenizer(model_path) or TokenizerConfig(kind="bytes")


def policy_tokenizer(cfg: Config) -> TokenizerConfig:
    """The policy's tokenizer, resolved (see ``TokenizerConfig.kind``)."""
    return resolve_tokenizer(cfg.tokenizer, cfg.policy.model.path)


def reward_tokenizer(reward: RewardConfig, policy_tok: TokenizerConfig) -> TokenizerConfig:
    """The reward model's own tokenizer when it comes with one, else the policy's."""
    own = model_tokenizer(reward.model.path) if reward.model is not None else None
    return own or policy_tok


def optimizer_steps(cfg: Config) -> int:
    """Optimizer steps of the whole run (what an LR schedule spans unless `decay_steps`)."""
    rows = cfg.rollout.batch_size * cfg.rollout.samples_per_prompt
    return cfg.train.rounds * cfg.ppo.epochs * (rows // cfg.ppo.minibatch_size)


def value_init_spec(cfg: Config) -> ModelSpec:
    """The critic's initial weights: its own model, or the reward model's when
    ``value.init_from_reward`` (a common choice: the critic starts knowing what scores well)."""
    if cfg.value.init_from_reward and cfg.reward.model is not None:
        return cfg.reward.model.model_copy(update={"dtype": cfg.value.model.dtype})
    return cfg.value.model


# ---------------------------------------------------------------------------------------------
# Loading, overrides and error messages


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}`` (values parsed as YAML scalars)."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc})") from None
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}")
            node = child
        node[leaf] = value
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _describe(error: ValidationError, source: str) -> str:
    parts = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            parts.append(f"`{field}` is not a known setting")
        elif item["type"] == "value_error" or item["type"].startswith("assertion"):
            msg = str(item["msg"]).removeprefix("Value error, ")
            parts.append(f"`{field}`: {msg}" if field != "(top level)" else msg)
        else:
            parts.append(f"`{field}`: {item['msg'].lower()} (got {item.get('input')!r})")
    return f"Invalid config ({source}): " + "; ".join(parts) + "."


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the embedded default when ``path`` is None), apply overrides."""
    return load_schema(Config, path, overrides)


def load_schema(
    schema: type[_Schema], path: str | Path | None = None, overrides: list[str] | None = None
) -> _Schema:
    """``load_config`` for any config schema (the stage configs of ``stage_config`` use it)."""
    raw: dict[str, Any] = {}
    source = "embedded default"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"Cannot read config file {path}: {exc.strerror}.") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"Config file {path} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"Config file {path} must hold a mapping at the top level.")
    if overrides:
        raw = _merge(raw, parse_overrides(overrides))
        source += " + command-line overrides"
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


def to_yaml(cfg: BaseModel) -> str:
    """The resolved config as YAML (what every run dir and checkpoint records)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
