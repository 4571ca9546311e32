"""The vLLM engine's arguments on a GPU and on the CPU, worked out by hand (no vLLM needed):
the run's longest sequence, not the model's 131,072 positions; a memory share computed from
the worker's weights and KV cache; tensor parallelism over the worker's GPUs."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from rlhf_ray.config.ppo import load_config
from rlhf_ray.engines.vllm_engine import engine_kwargs, kv_bytes_per_token
from rlhf_ray.errors import UserError
from rlhf_ray.workers.vllm_rollout import generator_kwargs

GIB = 2**30
# Llama-3.2-1B's shape: 16 layers, 8 KV heads of 64 dims, 131,072 positions
LLAMA_1B = LlamaConfig(
    hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
    head_dim=64, intermediate_size=8192, max_position_embeddings=131072, vocab_size=128256,
)  # fmt: skip
RUN = ["rollout.backend=vllm", "data.max_prompt_tokens=1024", "rollout.max_new_tokens=512",
       "policy.model.dtype=bfloat16", "rollout.vllm_kv_cache_gib=1"]  # fmt: skip


def _rollout(*extra: str):
    return load_config(None, [*RUN, *extra]).rollout


def test_kv_bytes_per_token_of_llama_1b():
    # keys and values (2) x 16 layers x 8 KV heads x 64 dims x 2 bytes (bf16) = 32 KiB
    assert kv_bytes_per_token(LLAMA_1B, "bfloat16") == 2 * 16 * 8 * 64 * 2 == 32768


def test_a_131072_position_model_gets_the_runs_longest_sequence_and_its_share_of_the_gpu():
    cfg = load_config(None, RUN)
    length = generator_kwargs(cfg)["max_model_len"]
    assert length == 1024 + 512  # data.max_prompt_tokens + rollout.max_new_tokens
    per_token = kv_bytes_per_token(LLAMA_1B, "bfloat16")
    kwargs = engine_kwargs(cfg.rollout, "bfloat16", length, per_token, (2 * GIB, 80 * GIB))
    assert kwargs["max_model_len"] == 1536
    assert kwargs["kv_cache_memory_bytes"] == GIB
    # (2 GiB weights + 1 GiB KV cache + 2 GiB overhead) / 80 GiB, not vLLM's 0.9
    assert kwargs["gpu_memory_utilization"] == pytest.approx(5 / 80)
    assert kwargs["tensor_parallel_size"] == 1
    assert kwargs["dtype"] == "bfloat16" and kwargs["skip_tokenizer_init"]

    # the model's full 131,072 positions take 4 GiB of KV cache: a clear error, not vLLM's
    with pytest.raises(UserError, match=r"cannot hold one sequence of 131072 tokens.*4\.00 GiB"):
        engine_kwargs(cfg.rollout, "bfloat16", 131072, per_token, (2 * GIB, 80 * GIB))


def test_two_gpus_per_worker_split_the_weights_by_tensor_parallelism():
    rollout = _rollout("rollout.num_gpus_per_worker=2")
    kwargs = engine_kwargs(rollout, "bfloat16", 1536, 32768, (2 * GIB, 80 * GIB))
    assert kwargs["tensor_parallel_size"] == 2
    assert kwargs["gpu_memory_utilization"] == pytest.approx((1 + 1 + 2) / 80)


def test_a_worker_that_cannot_fit_a_card_is_refused_and_the_cpu_gets_no_gpu_arguments():
    with pytest.raises(UserError, match=r"needs 19\.0 GiB per GPU.*rollout\.num_gpus_per_worker"):
        engine_kwargs(_rollout(), "bfloat16", 1536, 32768, (16 * GIB, 16 * GIB))
    cpu = engine_kwargs(_rollout(), "bfloat16", 1536, 32768, None)
    assert cpu["max_model_len"] == 1536
    assert not {"gpu_memory_utilization", "kv_cache_memory_bytes", "tensor_parallel_size"} & set(
        cpu
    )


def test_the_hf_backend_gets_no_vllm_arguments():
    assert generator_kwargs(load_config(None, [])) == {}
