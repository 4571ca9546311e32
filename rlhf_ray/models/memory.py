"""Per-device memory of each role, estimated from a model's ``config.json`` alone (no weights).

The pure part (``ModelShape``, ``learner_memory``, ``scorer_memory``, ``rollout_memory``) is
byte arithmetic, checked by hand in the tests. ``role_memory(cfg)`` reads each role's model
config and applies it; ``rlhf-ray plan`` prints the result and refuses a role that cannot fit.

What is counted, per device (one learner rank, one scorer replica, one rollout worker):

- parameters at the model dtype (ZeRO-3: 1/N of them plus those gathered: the larger of the
  prefetch bucket and ``max_live``; parameter offload: only those);
- gradients at the model dtype (ZeRO-2/3: 1/N of them plus the reduce bucket, whole on a GPU),
  or, when it is
  larger, what the optimizer step holds: the gradient partition cast to fp32 and AdamW's fp32
  temporaries for the tensor it steps (ZeRO-1/2: the whole partition; ZeRO-3: a sub-group);
- optimizer states: Adam's two fp32 moments, plus DeepSpeed's fp32 master copy (ZeRO >= 1, or
  half-precision weights); 1/N of them from ZeRO-1 on; none with optimizer offload;
- activations kept for the backward of one micro-batch of ``prompt + response`` tokens
  (Korthikanti et al. 2022's per-layer tensors; with gradient checkpointing only each layer's
  input plus one layer's tensors), and the fp32 logits/log-softmax of the responses;
- for rollout workers, the KV cache of their share of the batch at full length;
- a fixed per-process overhead (CUDA context, allocator slack) for GPU processes.

It is an estimate: allocator fragmentation, communication buffers beyond the buckets named
above, and framework workspaces vary by version and hardware.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from rlhf_ray.config.ppo import (
    ZERO_BUCKETS_CPU,
    ZERO_BUCKETS_GPU,
    Config,
    ModelSpec,
    has_critic,
    is_adapter_dir,
    policy_tokenizer,
    reward_tokenizer,
    value_init_spec,
)
from rlhf_ray.config.roles import reward_models
from rlhf_ray.models.known_configs import KNOWN_CONFIGS
from rlhf_ray.models.logprobs import HEAD_CHUNK_TOKENS

GB = 1e9
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GPU_OVERHEAD_BYTES = 1.0 * GB  # CUDA context + caching-allocator slack, per GPU process
# per CPU process, above the imported libraries: the tokenizer, the model code transformers
# imports lazily, and the allocator's slack (0.3-0.4 GB measured for SmolLM2's roles by
# benchmarks/real_memory.py)
CPU_OVERHEAD_BYTES = 0.35 * GB


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer that decide its memory."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    gpt2: bool  # learned positions, LayerNorm with biases, biased linears, 2-matrix GELU MLP
    positions: int = 0  # learned position embeddings (GPT-2)

    @classmethod
    def from_config(cls, d: dict[str, Any]) -> ModelShape:
        """From a ``config.json`` dict (Llama/Mistral/Qwen-style names or GPT-2's)."""
        gpt2 = d.get("model_type") == "gpt2" or "n_embd" in d
        hidden = d.get("hidden_size") or d["n_embd"]
        heads = d.get("num_attention_heads") or d["n_head"]
        return cls(
            vocab=d["vocab_size"],
            hidden=hidden,
            layers=d.get("num_hidden_layers") or d["n_layer"],
            heads=heads,
            kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or hidden // heads,
            intermediate=d.get("intermediate_size") or d.get("n_inner") or 4 * hidden,
            tied=bool(d.get("tie_word_embeddings", True)),
            gpt2=gpt2,
            positions=d.get("n_positions", 0) if gpt2 else 0,
        )

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_params(self) -> int:
        h, i, q = self.hidden, self.intermediate, self.heads * self.head_dim
        attn = h * q + 2 * h * self.kv_dim + q * h
        if self.gpt2:  # biases of c_attn, c_proj, c_fc, mlp c_proj; two LayerNorms (w, b)
            return attn + 2 * h * i + (q + 2 * self.kv_dim) + h + i + h + 4 * h
        return attn + 3 * h * i + 2 * h  # SwiGLU (gate, up, down), two RMSNorms

    def num_params(self, lm_head: bool = True) -> int:
        """Parameters of the causal LM (``lm_head``) or of a backbone + scalar head."""
        h = self.hidden
        embed = self.vocab * h + self.positions * h
        final_norm = 2 * h if self.gpt2 else h
        head = (0 if self.tied else self.vocab * h) if lm_head else h
        return embed + self.layers * self.layer_params() + final_norm + head

    def lora_params(self, r: int, targets: list[str] | None) -> int:
        """Adapter parameters of LoRA rank ``r`` on the modules named ``targets`` (null: the
        defaults of ``models.lora``): r x (in + out) per adapted matrix. Names not known
        here count nothing."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_dim
        if self.gpt2:  # c_proj names both the attention's and the MLP's output projection
            shapes = {"c_attn": [(h, q + 2 * kv)], "c_proj": [(q, h), (i, h)], "c_fc": [(h, i)]}
        else:
            shapes = {
                "q_proj": [(h, q)],
                "k_proj": [(h, kv)],
                "v_proj": [(h, kv)],
                "o_proj": [(q, h)],
                "gate_proj": [(h, i)],
                "up_proj": [(h, i)],
                "down_proj": [(i, h)],
            }
        names = targets or list(shapes)
        per_layer = sum(r * (a + b) for n in names for a, b in shapes.get(n, []))
        return self.layers * per_layer

    def activation_elements(self) -> int:
        """Elements kept per token per layer for the backward (SDPA attention: no scores)."""
        h, i = self.hidden, self.intermediate
        if self.gpt2:  # ln1 in/out, qkv, attn out, proj in, ln2 in/out, fc out, gelu out
            return 8 * h + 2 * self.kv_dim + 2 * i
        return 6 * h + 2 * self.kv_dim + 4 * i  # norms, q/k/v, attn out, gate, up, act, product


@dataclass(frozen=True)
class Estimate:
    """Bytes per device by part, and where it was computed from."""

    parts: dict[str, float]
    source: str

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def states(self) -> float:
        """Parameters, gradients and optimizer states (the rest: activations, KV cache,
        overhead)."""
        return sum(self.parts.get(k, 0.0) for k in ("params", "grads", "optimizer"))


def learner_memory(
    shape: ModelShape,
    *,
    lm_head: bool,
    dtype: str,
    ranks: int,
    zero_stage: int,
    engine: str,
    offload_optimizer: bool,
    offload_params: bool,
    micro_batch: int,
    seq_len: int,
    response_len: int,
    checkpointing: bool,
    on_gpu: bool,
    buckets: dict[str, int] | None = None,
    trainable: int | None = None,
) -> dict[str, float]:
    """Bytes on one learner rank's device at its peak while it trains, with the ZeRO bucket
    sizes the engine is given (``config.ZeroBuckets.resolve``; default: the device's).
    ``trainable``: LoRA's adapter parameters (``ModelShape.lora_params``), the only ones with
    gradients and optimizer states; the frozen base adds only its weights.

    ``grads`` is the larger of two moments: the end of the backward (the gradients this stage
    keeps, plus the reduce bucket) and the optimizer step (the gradient partition flattened into
    fp32 and AdamW's temporaries, one fp32 copy of the stepped tensor with torch's foreach
    kernels on GPU, two with its single-tensor kernels on CPU). ZeRO-1/2 step their whole
    partition as one flat tensor; ZeRO-3 steps a sub-group (a bucket) at a time, but keeps a
    flat gradient partition all along."""
    p, wb = shape.num_params(lm_head), DTYPE_BYTES[dtype]
    deepspeed = engine == "deepspeed"
    b = buckets or (ZERO_BUCKETS_GPU if on_gpu else ZERO_BUCKETS_CPU)
    # the reduce buffer: DeepSpeed allocates the whole bucket, but the host only pages in what
    # it writes (at most the model), the GPU's allocator all of it
    bucket = (b["reduce"] if on_gpu else min(p, b["reduce"])) * wb
    params = 0.0 if offload_params else p * wb / (ranks if zero_stage == 3 else 1)
    if deepspeed and zero_stage == 3:  # the parameters gathered and kept for reuse at most
        params += min(p, max(b["prefetch"], b["max_live"])) * wb
    zero = zero_stage if deepspeed else 0
    if trainable is not None:  # LoRA: the adapters are weights too; they alone train
        params += trainable * wb / (ranks if zero_stage == 3 else 1)
        p, bucket = trainable, min(bucket, trainable * wb)
    grads = _gradient_peak(shape, p, wb, zero, ranks, on_gpu, offload_optimizer, bucket, b)
    master = 4 * p if deepspeed and (zero_stage >= 1 or wb < 4) else 0
    optim = (8 * p + master) / (ranks if deepspeed and zero_stage >= 1 else 1)
    if offload_optimizer:
        optim = 0.0
    acts = _activations(shape, wb, micro_batch, seq_len, response_len, checkpointing, lm_head)
    parts = {"params": params, "grads": float(grads), "optimizer": optim, "activations": acts}
    parts["overhead"] = GPU_OVERHEAD_BYTES if on_gpu else CPU_OVERHEAD_BYTES
    return parts


def _gradient_peak(
    shape: ModelShape,
    p: int,
    wb: int,
    zero: int,
    ranks: int,
    on_gpu: bool,
    offloaded: bool,
    bucket: float,
    buckets: dict[str, int],
) -> float:
    """The larger of the end of the backward and the optimizer step (``learner_memory``);
    ``zero`` 0 is per-parameter AdamW (the torch engine, or ZeRO off); ``bucket`` the reduce
    buffer's bytes, ``buckets`` the ZeRO bucket sizes in elements."""
    temporaries = 1 if on_gpu else 2  # fp32 copies AdamW makes of the tensor it steps
    fp32_copy = 4 if wb < 4 else 0  # half-precision gradients are cast for the fp32 step
    if zero == 0:  # per-parameter AdamW: the embedding is the largest (LoRA: an adapter)
        backward = p * wb
        step = p * wb + 4 * temporaries * min(p, shape.vocab * shape.hidden)
    elif zero == 3:
        kept = p * wb / ranks  # DeepSpeed's flat gradient partition
        chunk = min(p / ranks, buckets["sub_group"])
        backward = kept + bucket
        step = kept + chunk * (wb + fp32_copy + 4 * temporaries)
    else:  # ZeRO-1 holds every gradient until the step, ZeRO-2 only its partition
        backward = (p * wb if zero <= 1 else p * wb / ranks) + bucket
        step = p / ranks * (wb + fp32_copy + 4 * temporaries)
    if offloaded:  # the step runs on the host
        step = 0.0
    return float(max(backward, step))


def _activations(
    shape: ModelShape,
    wb: int,
    micro_batch: int,
    seq_len: int,
    response_len: int,
    checkpointing: bool,
    lm_head: bool,
) -> float:
    """Activations kept for the backward of one micro-batch (``learner_memory``)."""
    tokens = micro_batch * seq_len
    per_layer = shape.activation_elements() * tokens * wb
    if checkpointing:
        acts = shape.layers * tokens * shape.hidden * wb + per_layer
    else:
        acts = shape.layers * per_layer
    if lm_head:  # the head runs on response positions only, one chunk at a time, recomputed in
        # the backward (models/logprobs.py): one chunk's fp32 logits and their gradient
        acts += 2 * min(micro_batch * response_len, HEAD_CHUNK_TOKENS) * shape.vocab * 4
    return float(acts)


def scorer_memory(
    shape: ModelShape,
    *,
    lm_head: bool,
    dtype: str,
    rows: int,
    seq_len: int,
    response_len: int,
    on_gpu: bool,
) -> dict[str, float]:
    """Bytes on a frozen scorer's device (reference or reward model): weights and one no-grad
    forward of ``rows`` sequences: one layer's tensors alive at a time, then (a causal LM) the
    head on the response positions, one chunk of them at a time (models/logprobs.py): its
    logits, their fp32 cast if half, and the fp32 log-softmax."""
    wb = DTYPE_BYTES[dtype]
    tokens = rows * seq_len
    acts = shape.activation_elements() * tokens * wb
    if lm_head:
        chunk = min(rows * response_len, HEAD_CHUNK_TOKENS)
        acts = max(acts, chunk * shape.vocab * (wb + (4 if wb < 4 else 0) + 4))
    acts += tokens * shape.hidden * wb  # the last hidden states, kept for the head
    parts = {"params": shape.num_params(lm_head) * wb, "activations": float(acts)}
    parts["overhead"] = GPU_OVERHEAD_BYTES if on_gpu else CPU_OVERHEAD_BYTES
    return parts


def rollout_memory(
    shape: ModelShape, *, dtype: str, rows: int, seq_len: int, on_gpu: bool
) -> dict[str, float]:
    """Bytes on a rollout worker's device: weights, the KV cache of ``rows`` sequences at full
    length, and the prefill's transient tensors (one layer at a time, last-token logits)."""
    wb = DTYPE_BYTES[dtype]
    kv = 2 * shape.layers * shape.kv_dim * rows * seq_len * wb
    prefill = shape.activation_elements() * rows * seq_len * wb + rows * shape.vocab * 4
    parts = {"params": shape.num_params() * wb, "kv_cache": float(kv), "activations": prefill}
    parts["overhead"] = GPU_OVERHEAD_BYTES if on_gpu else CPU_OVERHEAD_BYTES
    return parts


# ---------------------------------------------------------------------------------------------
# reading configs and applying the arithmetic to a run's config


def read_model_config(spec: ModelSpec, tokenizer_cfg) -> tuple[dict[str, Any] | None, str]:
    """A model's ``config.json`` as a dict, and where it came from (None: not readable here).

    Local directories are read directly (an adapter directory: its base's); hub ids come from
    the local HF cache or ``KNOWN_CONFIGS``; never the network. Presets are built from their
    settings."""
    if is_adapter_dir(spec.path):
        from rlhf_ray.models.lora import adapter_base

        spec = spec.model_copy(update={"path": adapter_base(spec)})
    if spec.path is None:
        try:
            from rlhf_ray.data.tokenization import build_tokenizer
            from rlhf_ray.models.build import preset_config

            config = preset_config(cast(Any, spec), build_tokenizer(tokenizer_cfg))
        except Exception as exc:  # e.g. a hub tokenizer with no network
            return None, f"preset {spec.preset} (tokenizer not loadable: {exc})"
        return config.to_dict(), f"preset {spec.preset}"
    local = Path(spec.path) / "config.json"
    if local.is_file():
        return json.loads(local.read_text()), str(local)
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec.path, "config.json")
    except Exception:
        cached = None
    if isinstance(cached, str):
        return json.loads(Path(cached).read_text()), f"{spec.path} (HF cache)"
    if spec.path in KNOWN_CONFIGS:
        return KNOWN_CONFIGS[spec.path], f"{spec.path} (built-in copy of its config.json)"
    return None, f"{spec.path}: config.json not readable offline"


def _seq_len(cfg: Config) -> int:
    return cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens


def role_memory(cfg: Config) -> dict[str, Estimate | str]:
    """Per role: the estimate per device, or why there is none."""
    seq, tok = _seq_len(cfg), policy_tokenizer(cfg)
    return {
        **learners_memory(cfg, tok, seq),
        **scorers_memory(cfg, tok, seq),
        "rollout": generator_memory(cfg, tok, seq),
    }


def learners_memory(cfg: Config, tok: Any, seq: int) -> dict[str, Estimate | str]:
    """The policy's and (with a critic) the value learner's estimates, or why there is none."""
    out: dict[str, Estimate | str] = {}
    micro = cfg.ppo.micro_batch_size
    learners = [("policy", cfg.policy, cfg.policy.model, True)]
    if has_critic(cfg):  # a critic-free estimator has no value group
        learners.append(("value", cfg.value, value_init_spec(cfg), False))
    for role, role_cfg, spec, lm_head in learners:
        config, source = read_model_config(spec, tok)
        if config is None:
            out[role] = source
            continue
        shape = ModelShape.from_config(config)
        lora = role_cfg.lora
        trainable = shape.lora_params(lora.r, lora.target_modules) if lora else None
        if trainable is not None and not lm_head:  # a scalar model trains its head whole too
            trainable += shape.hidden
        parts = learner_memory(
            shape,
            lm_head=lm_head,
            dtype=role_cfg.model.dtype,
            ranks=role_cfg.num_ranks,
            zero_stage=role_cfg.zero_stage,
            engine=role_cfg.engine_for(role_cfg.num_ranks, role_cfg.model.dtype),
            offload_optimizer=role_cfg.offload_optimizer,
            offload_params=role_cfg.offload_params,
            micro_batch=micro or cfg.ppo.minibatch_size // role_cfg.num_ranks,
            seq_len=seq,
            response_len=cfg.rollout.max_new_tokens,
            checkpointing=role_cfg.gradient_checkpointing,
            on_gpu=role_cfg.num_gpus_per_rank > 0,
            buckets=role_cfg.zero_buckets.resolve(role_cfg.num_gpus_per_rank > 0),
            trainable=trainable,
        )
        out[role] = Estimate(parts, source + (f", LoRA r={lora.r}" if lora else ""))
    return out


def scorers_memory(cfg: Config, tok: Any, seq: int) -> dict[str, Estimate | str]:
    """The reference's and the reward's estimates (a reward function or service: none)."""
    out: dict[str, Estimate | str] = {}
    ref_spec = cfg.reference.model or cfg.policy.model
    scorers: list[tuple[str, Any, ModelSpec, bool, Any]] = [
        ("reference", cfg.reference, ref_spec, True, tok)
    ] * (not cfg.reference.from_policy_base)  # (else the policy learner's base scores it)
    # every reward model (main, ensemble members, terms' models) lives in each reward replica
    reward_specs = reward_models(cfg.reward) + [t.model for t in cfg.reward.terms if t.model]
    for spec in reward_specs:
        scorers.append(("reward", cfg.reward, spec, False, reward_tokenizer(cfg.reward, tok, spec)))
    if cfg.reward.model is None:
        remote = cfg.reward.remote
        source = f"remote service {remote.url}" if remote else f"function {cfg.reward.function}"
        out["reward"] = Estimate({}, source)
    if cfg.reward.remote is not None or any(t.remote for t in cfg.reward.terms):
        out["remote"] = Estimate({}, "a reward service, elsewhere")
    for role, sc, spec, lm_head, sc_tok in scorers:
        config, source = read_model_config(spec, sc_tok)
        if config is None:
            out[role] = source
            continue
        parts = scorer_memory(
            ModelShape.from_config(config),
            lm_head=lm_head,
            dtype=spec.dtype,
            rows=sc.score_micro_batch_size,
            seq_len=seq,
            response_len=cfg.rollout.max_new_tokens,
            on_gpu=sc.num_gpus > 0,
        )
        held = out.get(role)
        if isinstance(held, Estimate):  # another model of the same replica: they add up
            parts = {k: held.parts.get(k, 0.0) + parts.get(k, 0.0) for k in {*held.parts, *parts}}
            source = f"{held.source} + {source}"
        out[role] = Estimate(parts, source)
    return out


def generator_memory(cfg: Config, tok: Any, seq: int) -> Estimate | str:
    """A rollout worker's estimate, or why there is none."""
    config, source = read_model_config(cfg.policy.model, tok)
    if config is None:
        return source
    r = cfg.rollout
    # a worker generates its shard at once, or in micro-batches of rollout.micro_batch_size
    rows = math.ceil(r.batch_size * r.samples_per_prompt / r.num_workers)
    rows = min(rows, r.micro_batch_size or rows)
    parts = rollout_memory(
        ModelShape.from_config(config),
        dtype=cfg.policy.model.dtype,
        rows=rows,
        seq_len=seq,
        on_gpu=r.num_gpus_per_worker > 0,
    )
    if r.backend == "vllm":  # vLLM reserves its KV cache up front, at the configured size
        parts["kv_cache"] = float(r.vllm_kv_cache_gib * 2**30)
    return Estimate(parts, source)


def memory_problems(
    estimates: dict[str, Estimate | str], gpus_per_actor: dict[str, float], gpu_gb: float | None
) -> list[str]:
    """Roles whose estimate exceeds their share of one GPU (``gpus_per_actor`` x ``gpu_gb``);
    CPU roles and unknown estimates are not checked."""
    if gpu_gb is None:
        return []
    problems = []
    for role, est in estimates.items():
        gpus = gpus_per_actor.get(role, 0.0)
        if isinstance(est, str) or gpus <= 0:
            continue
        have = gpus * gpu_gb  # a fraction of a GPU when roles share one
        if est.total > have * GB:
            biggest = max(est.parts, key=lambda k: est.parts[k])
            problems.append(
                f"{role} needs ~{est.total / GB:.1f} GB per device but has {have:g} GB "
                f"({gpus:g} x {gpu_gb:g} GB GPU; largest part: {biggest} "
                f"{est.parts[biggest] / GB:.1f} GB) - consider ZeRO-3, more ranks, optimizer/"
                "parameter offload, gradient checkpointing or a smaller ppo.micro_batch_size"
            )
    return problems
