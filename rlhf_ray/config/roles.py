"""The config sections of the models and their roles: weights, optimizer, ZeRO buckets, the
policy and value learners, the frozen scorers (reference, reward) and the tokenizer.
``rlhf_ray.config.ppo`` re-exports every name.
"""

from __future__ import annotations

import json
import os
from typing import Any, Literal

from pydantic import Field, model_validator

from rlhf_ray.config.model_spec import ModelSpec
from rlhf_ray.config.rewards import RemoteRewardConfig, RewardEnsemble, RewardTerm
from rlhf_ray.config.sections import Section


class OptimSpec(Section):
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


class ZeroBuckets(Section):
    """DeepSpeed ZeRO's bucket sizes, in elements (``zero_optimization``). Unset (null): the
    default of the rank's device, ``ZERO_BUCKETS_GPU`` (DeepSpeed's own: few large NCCL calls)
    or ``ZERO_BUCKETS_CPU`` (1e7: small buffers for the small models of CPU runs)."""

    reduce: int | None = Field(
        None,
        gt=0,
        description="reduce_bucket_size: gradient elements per reduction (ZeRO-2/3 "
        "allocate a buffer this large on the device).",
    )
    allgather: int | None = Field(
        None,
        gt=0,
        description="allgather_bucket_size: parameter elements per all-gather "
        "after a ZeRO-1/2 step.",
    )
    prefetch: int | None = Field(
        None,
        gt=0,
        description="stage3_prefetch_bucket_size: parameter elements ZeRO-3 "
        "gathers ahead of their use.",
    )
    max_live: int | None = Field(
        None,
        gt=0,
        description="stage3_max_live_parameters: gathered parameter elements a "
        "ZeRO-3 rank keeps alive at most.",
    )
    max_reuse_distance: int | None = Field(
        None,
        gt=0,
        description="stage3_max_reuse_distance: a gathered ZeRO-3 parameter used "
        "again within this many elements is kept rather than released.",
    )
    sub_group: int | None = Field(
        None,
        gt=0,
        description="sub_group_size: parameter elements the ZeRO-3 optimizer steps at a time.",
    )

    def resolve(self, on_gpu: bool) -> dict[str, int]:
        """Every size: the one set here, else the device's default."""
        default = ZERO_BUCKETS_GPU if on_gpu else ZERO_BUCKETS_CPU
        return {k: default[k] if v is None else v for k, v in self.model_dump().items()}


# DeepSpeed's defaults (deepspeed/runtime/zero/config.py): 5e8 is larger than a Llama-8B layer
ZERO_BUCKETS_GPU: dict[str, int] = dict(
    reduce=500_000_000,
    allgather=500_000_000,
    prefetch=50_000_000,
    max_live=1_000_000_000,
    max_reuse_distance=1_000_000_000,
    sub_group=1_000_000_000,
)
# CPU runs train models of at most ~100M parameters in host memory: 1e7 keeps ZeRO's buffers
# (allocated at the full bucket size) small and ZeRO-3 gathering a few layers at a time
ZERO_BUCKETS_CPU: dict[str, int] = {k: 10_000_000 for k in ZERO_BUCKETS_GPU}


class LoraSpec(Section):
    """LoRA (peft) on a learner's model: only the adapters (and `modules_to_save`) train; the
    base weights stay frozen. Defaults follow common practice for RLHF on small models."""

    r: int = Field(16, gt=0, description="Rank of each adapter's A (r x in) and B (out x r).")
    alpha: float = Field(32.0, gt=0, description="Scaling numerator: updates are x alpha / r.")
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Dropout on the adapters' input (0: PPO needs identical forwards for "
        "sampling, old and new log-probs).",
    )
    target_modules: list[str] | None = Field(
        None,
        description="Module names that get adapters (null: the attention and MLP projections "
        "of the architecture, e.g. llama q/k/v/o/gate/up/down_proj, gpt2 c_attn/c_proj/c_fc; "
        "peft's 'all-linear' for other architectures).",
    )
    modules_to_save: list[str] | None = Field(
        None,
        description="Modules trained whole beside the adapters (null: none for a causal LM, "
        "the scalar head `score` for a value or reward model).",
    )


class LearnerConfig(Section):
    """A learner group: the data-parallel ranks that train one model with one engine. PPO's
    ``policy`` and ``value`` sections are this plus their model and optimizer; the ``learner``
    section of ``rlhf-ray sft`` and ``train-rm`` is this (their model and optimizer are the
    stage's ``model`` and ``optim``). One section, so every stage trains alike."""

    engine: Literal["auto", "deepspeed", "torch"] = Field(
        "auto",
        description="Training engine: DeepSpeed ZeRO, plain torch AdamW (one rank only), or "
        "auto: torch where the group trains on one rank (in process, or num_ranks 1) with "
        "float32 weights, no offload and zero_stage below 3, DeepSpeed otherwise (`engine_for`).",
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
        16,
        gt=0,
        description="Rows per forward when this learner scores without gradients (a PPO "
        "round's log-probs or values, a stage's evaluation).",
    )
    zero_buckets: ZeroBuckets = Field(
        default_factory=ZeroBuckets,
        description="DeepSpeed ZeRO bucket sizes (elements); unset ones follow the device.",
    )
    lora: LoraSpec | None = Field(
        None,
        description="Train LoRA adapters instead of every weight (null: full fine-tuning). A "
        "`model.path` that is a PEFT adapter directory (not merged) trains that adapter "
        "further with its own r, alpha and targets.",
    )

    @model_validator(mode="after")
    def _engine_ranks(self) -> LearnerConfig:
        if self.engine == "torch" and self.num_ranks != 1:
            raise ValueError("engine 'torch' trains on one rank: set num_ranks=1 or use deepspeed")
        if self.offload_params and (self.engine == "torch" or self.zero_stage != 3):
            raise ValueError("offload_params needs engine deepspeed with zero_stage 3")
        if self.num_ranks > 1 and 0 < self.num_gpus_per_rank < 1:
            raise ValueError(
                f"num_gpus_per_rank {self.num_gpus_per_rank:g} < 1 with {self.num_ranks} ranks "
                "would put ranks of one NCCL group on the same GPU, which NCCL refuses; "
                "colocate different roles on a GPU instead, or use num_ranks=1"
            )
        if self.num_gpus_per_rank > 1:
            raise ValueError(
                f"num_gpus_per_rank {self.num_gpus_per_rank:g} > 1: a learner rank drives one "
                "GPU (data parallel, the first GPU Ray assigns it, LOCAL_RANK 0), so the others "
                "would sit idle; use more num_ranks instead"
            )
        return self

    def engine_for(self, ranks: int, dtype: str) -> Literal["deepspeed", "torch"]:
        """The engine a group of ``ranks`` ranks training ``dtype`` weights runs: ``engine``
        unless it is auto. Auto takes plain torch AdamW on one rank with float32 weights, no
        offload and no ZeRO-3 asked for: there ZeRO partitions nothing, and on a CPU DeepSpeed's
        flat gradient buffers and fp32 master copy cost seconds a step (docs/design.md,
        "Engines"); the two take the same steps (to float rounding). DeepSpeed otherwise: ZeRO
        over ranks, fp32 master weights for half precision, offloads, ZeRO-3's partitioned
        loading."""
        if self.engine != "auto":
            return self.engine
        zero = self.offload_optimizer or self.offload_params or self.zero_stage == 3
        return "torch" if ranks == 1 and dtype == "float32" and not zero else "deepspeed"

    def check_model(self, model: ModelSpec) -> None:
        """Raise ValueError if this group cannot train ``model`` (its dtype)."""
        if self.engine == "torch" and model.dtype != "float32":
            raise ValueError(
                f"engine 'torch' with model.dtype {model.dtype} would run AdamW on "
                "half-precision weights with no fp32 master copy (small updates round away); "
                "use model.dtype float32, or engine deepspeed (fp32 master weights)"
            )


class PolicyConfig(LearnerConfig):
    """The trained policy: its model, optimizer and the learner group that trains it."""

    model: ModelSpec = Field(default_factory=ModelSpec, description="Policy weights source.")
    optim: OptimSpec = Field(default_factory=OptimSpec, description="Optimizer.")

    @model_validator(mode="after")
    def _trains_model(self) -> PolicyConfig:
        self.check_model(self.model)
        return self


class ValueConfig(PolicyConfig):
    """The critic: an LM backbone with a scalar head, trained like the policy."""

    num_ranks: int = Field(1, ge=1, description="Data-parallel critic ranks.")
    init_from_reward: bool = Field(
        False, description="Initialise the critic from the reward model's weights."
    )


class ScorerConfig(Section):
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
    from_policy_base: bool = Field(
        False,
        description="With a LoRA policy: the reference is the policy learner's own base with "
        "its adapters disabled, so no reference actor and no second copy of the model "
        "(false: a separate reference actor, the only choice for full fine-tuning).",
    )

    @model_validator(mode="after")
    def _one_reference(self) -> ReferenceConfig:
        if self.from_policy_base and self.model is not None:
            raise ValueError(
                "reference.from_policy_base uses the policy's base as the reference: "
                "leave reference.model unset"
            )
        return self

    def check_policy(self, policy: PolicyConfig) -> None:
        """Raise ValueError if ``from_policy_base`` is set for a policy without LoRA (both
        rollout backends sample a LoRA policy)."""
        if self.from_policy_base and not trains_lora(policy.lora, policy.model):
            raise ValueError(
                "reference.from_policy_base needs a LoRA policy (its base with the adapters "
                "off is the reference): set policy.lora, or use the reference actor "
                "(reference.from_policy_base=false) for full fine-tuning"
            )


DEFAULT_REWARD_FUNCTION = "rlhf_ray.rewards:lowercase_fraction"


class RewardConfig(ScorerConfig):
    """Where the scalar score of a response comes from: a function or a reward model."""

    function: str | None = Field(
        None,
        description="'package.module:callable' called as fn(prompts, responses) -> list[float] "
        "(parameters named after prompt-set columns, or **columns, get those columns). "
        f"Unset: {DEFAULT_REWARD_FUNCTION!r} when no `model` or `remote` is given.",
    )
    model: ModelSpec | list[ModelSpec] | None = Field(
        None,
        description="Reward model (sequence-classification checkpoint, e.g. RUN/reward_model of "
        "`rlhf-ray train-rm`); replaces the default function. A directory holding its own "
        "tokenizer is fed the rollout text encoded with that tokenizer. A list of 2 or more: an "
        "ensemble, every member scored by each reward replica and combined by "
        "`reward.ensemble`.",
    )
    ensemble: RewardEnsemble = Field(
        default_factory=RewardEnsemble,
        description="How an ensemble's members combine (only with a list in `model`).",
    )
    normalize: Literal["auto", "running", "batch", "model", "none"] = Field(
        "auto",
        description="Standardise scores with: 'running' mean/std of every score so far (kept in "
        "checkpoints), 'batch' the round's own, 'model' the reward model's stored train-set "
        "statistics (a reward.remote service: those its GET .../info reports), or 'none'. "
        "'auto': running for a reward model, none for a function, and for a service what its "
        "info route says (none without one).",
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
    remote: RemoteRewardConfig | None = Field(
        None, description="A reward service (see README, 'Remote rewards'); replaces the function."
    )
    terms: list[RewardTerm] = Field(
        default_factory=list,
        description="Weighted terms added to the main score (model, function or remote): "
        "each {name, weight, function | remote}, logged as reward/<name>_mean.",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_function(cls, data: Any) -> Any:
        """An unset `function` means the built-in one only when no `model` or `remote` is given."""
        if (
            isinstance(data, dict)
            and "function" not in data
            and data.get("model") is None
            and data.get("remote") is None
        ):
            return {**data, "function": DEFAULT_REWARD_FUNCTION}
        return data

    @model_validator(mode="after")
    def _one_source(self) -> RewardConfig:
        if sum(x is not None for x in (self.function, self.model, self.remote)) != 1:
            raise ValueError(
                "set exactly one of `function`, `model` and `remote` (set function=null to use "
                "the model or the remote service)"
            )
        names = [t.name for t in self.terms]
        if len(set(names)) != len(names):
            raise ValueError(f"reward.terms names must differ, got {names}")
        if isinstance(self.model, list):
            self._check_ensemble(self.model)
        if self.normalize == "model" and isinstance(self.model, list):
            raise ValueError(
                "normalize 'model' reads one reward model's statistics; an ensemble's members "
                "are standardised by reward.ensemble.standardize: use normalize 'running'"
            )
        saved = isinstance(self.model, ModelSpec) and self.model.path is not None
        if self.normalize == "model" and not saved and self.remote is None:
            raise ValueError(
                "normalize 'model' reads the statistics stored with a saved reward model (or "
                "reported by a serve-reward service): set model.path, or use normalize 'running'"
            )
        if self.function is not None and ":" not in self.function:
            raise ValueError(f"function {self.function!r} must look like 'package.module:callable'")
        return self

    def _check_ensemble(self, members: list[ModelSpec]) -> None:
        if len(members) < 2:
            raise ValueError(
                f"reward.model: an ensemble needs 2 or more models, got {len(members)} (give "
                "one model as a mapping, not a list)"
            )
        if self.ensemble.standardize == "model":
            unsaved = [i for i, m in enumerate(members) if m.path is None]
            if unsaved:
                raise ValueError(
                    f"reward.ensemble.standardize 'model' reads the statistics stored with each "
                    f"saved member; reward.model members {unsaved} have no path (set "
                    "reward.ensemble.standardize=none)"
                )


def reward_models(reward: RewardConfig) -> list[ModelSpec]:
    """The reward models of ``reward.model``: none, one, or an ensemble's members."""
    if reward.model is None:
        return []
    return list(reward.model) if isinstance(reward.model, list) else [reward.model]


class TokenizerConfig(Section):
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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(path: str | None) -> bool:
    """Whether ``path`` is a local PEFT adapter directory (it holds ``adapter_config.json``)."""
    return path is not None and os.path.isfile(
        os.path.join(os.path.expanduser(path), ADAPTER_CONFIG)
    )


def trains_lora(lora: LoraSpec | None, model: ModelSpec) -> bool:
    """Whether a learner with ``lora`` (its ``lora`` section) trains LoRA adapters on
    ``model``: the section is set, or the model is an adapter directory trained further (not
    merged first)."""
    return lora is not None or (is_adapter_dir(model.path) and not model.merge_adapter)


def model_tokenizer(model_path: str | None) -> TokenizerConfig | None:
    """The tokenizer a model comes with: a local directory's saved Hugging Face tokenizer, or
    (a path that is not local: a hub id) the hub repo's; for a PEFT adapter directory without
    one, its base's (``base_model_name_or_path``); None for a directory without one."""
    if model_path is None:
        return None
    path = os.path.expanduser(model_path)
    if not os.path.exists(path) or any(
        os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES
    ):
        return TokenizerConfig(kind="hf", name_or_path=path)
    if is_adapter_dir(path):  # e.g. a checkpoint's policy/adapter: the base holds the tokenizer
        with open(os.path.join(path, ADAPTER_CONFIG), encoding="utf-8") as f:
            base = json.load(f).get("base_model_name_or_path")
        return model_tokenizer(base) if base else None
    return None


def resolve_tokenizer(tok: TokenizerConfig, model_path: str | None) -> TokenizerConfig:
    """``tok`` itself unless its kind is 'auto'; then the tokenizer the model at ``model_path``
    comes with, else the built-in bytes."""
    if tok.kind != "auto":
        return tok
    return model_tokenizer(model_path) or TokenizerConfig(kind="bytes")


def reward_tokenizer(
    reward: RewardConfig, policy_tok: TokenizerConfig, spec: ModelSpec | None = None
) -> TokenizerConfig:
    """A reward model's own tokenizer when it comes with one, else the policy's: ``spec``'s
    (an ensemble member, a term's model), by default the (first) ``reward.model``'s."""
    spec = spec or next(iter(reward_models(reward)), None)
    own = model_tokenizer(spec.path) if spec is not None else None
    return own or policy_tok
