"""The memory estimate: hand-checked byte arithmetic on a toy shape, parameter counts equal to
real Hugging Face models, and `plan` refusing an 8B policy on one 24 GB GPU."""

from __future__ import annotations

import dataclasses
import json

import pytest
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from rlhf_ray.cli import main
from rlhf_ray.config.ppo import ZERO_BUCKETS_CPU, ZERO_BUCKETS_GPU
from rlhf_ray.models.logprobs import HEAD_CHUNK_TOKENS
from rlhf_ray.models.memory import (
    CPU_OVERHEAD_BYTES,
    ModelShape,
    learner_memory,
    memory_problems,
    rollout_memory,
    scorer_memory,
)

# vocab 10, hidden 4, 2 layers, 2 heads of dim 2, 1 KV head, MLP 8, untied
TOY = ModelShape(vocab=10, hidden=4, layers=2, heads=2, kv_heads=1, head_dim=2, intermediate=8,
                 tied=False, gpt2=False)  # fmt: skip

LLAMA_8B = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    max_position_embeddings=131072, tie_word_embeddings=False, torch_dtype="bfloat16",
)  # fmt: skip


def test_parameter_count_by_hand():
    # layer: q 4x4 + k,v 4x2 each + o 4x4 = 48; SwiGLU 3 x 4x8 = 96; two norms 8 -> 152
    assert TOY.layer_params() == 152
    # embeddings 40 + 2 layers 304 + final norm 4 + lm_head 40 (untied) = 388
    assert TOY.num_params() == 388
    assert TOY.num_params(lm_head=False) == 40 + 304 + 4 + 4  # a scalar head instead


@pytest.mark.parametrize(
    "config",
    [
        LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
        GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=16),
    ],
)  # fmt: skip
def test_parameter_count_matches_the_real_model(config):
    model = AutoModelForCausalLM.from_config(config)
    shape = ModelShape.from_config(config.to_dict())
    assert shape.num_params() == sum(p.numel() for p in model.parameters())


WHOLE = {k: 388 for k in ZERO_BUCKETS_GPU}  # buckets of exactly the toy model


def test_learner_memory_by_hand():
    parts = learner_memory(
        TOY, lm_head=True, dtype="float32", ranks=2, zero_stage=3, engine="deepspeed",
        offload_optimizer=False, offload_params=False, micro_batch=2, seq_len=5, response_len=3,
        checkpointing=False, on_gpu=False,
    )  # fmt: skip
    bucket = 388 * 4  # the whole toy model fits one gather/reduce bucket
    assert ZERO_BUCKETS_CPU["reduce"] > 388  # (on the host only the pages written count)
    assert parts["params"] == 388 * 4 / 2 + bucket  # own half + the gathered bucket
    # the larger of: the backward's partition + bucket (776 + 1552) and the step's partition +
    # a sub-group (the whole half here) cast-free (fp32) with two fp32 AdamW temporaries on CPU
    assert parts["grads"] == max(388 * 4 / 2 + bucket, 388 * 4 / 2 + 388 / 2 * (4 + 2 * 4))
    assert parts["optimizer"] == (8 * 388 + 4 * 388) / 2  # Adam m, v + fp32 master, halved
    # 10 tokens x (6h + 2kv + 4i = 60) x 4 B x 2 layers + the head on the 2x3 response
    # positions only (one chunk): fp32 logits and their gradient, 2 x 6 x 10 x 4
    assert parts["activations"] == 2 * 2400 + 480
    assert parts["overhead"] == CPU_OVERHEAD_BYTES  # the tokenizer, lazy imports, slack
    ckpt = learner_memory(
        TOY, lm_head=True, dtype="float32", ranks=2, zero_stage=3, engine="deepspeed",
        offload_optimizer=True, offload_params=True, micro_batch=2, seq_len=5, response_len=3,
        checkpointing=True, on_gpu=True, buckets=WHOLE,
    )  # fmt: skip
    assert ckpt["params"] == bucket and ckpt["optimizer"] == 0
    assert ckpt["grads"] == 388 * 4 / 2 + bucket  # the step runs on the host
    assert ckpt["activations"] == 2 * 10 * 4 * 4 + 2400 + 480  # layer inputs + one layer
    assert ckpt["overhead"] == 1e9
    zero1 = learner_memory(
        TOY, lm_head=True, dtype="float32", ranks=2, zero_stage=1, engine="deepspeed",
        offload_optimizer=False, offload_params=False, micro_batch=2, seq_len=5, response_len=3,
        checkpointing=False, on_gpu=False,
    )  # fmt: skip
    assert (zero1["params"], zero1["grads"]) == (388 * 4, 388 * 4 + bucket)  # all until the step
    zero2_bf16_gpu = learner_memory(
        TOY, lm_head=True, dtype="bfloat16", ranks=2, zero_stage=2, engine="deepspeed",
        offload_optimizer=False, offload_params=False, micro_batch=2, seq_len=5, response_len=3,
        checkpointing=False, on_gpu=True, buckets=WHOLE,
    )  # fmt: skip
    # the step: the bf16 partition (194 x 2 B), its fp32 cast and one foreach temporary (x 4 B)
    assert zero2_bf16_gpu["grads"] == 194 * (2 + 4 + 4)
    deepspeed_sizes = learner_memory(
        TOY,
        lm_head=True,
        dtype="bfloat16",
        ranks=2,
        zero_stage=2,
        engine="deepspeed",
        offload_optimizer=False,
        offload_params=False,
        micro_batch=2,
        seq_len=5,
        response_len=3,
        checkpointing=False,
        on_gpu=True,
    )
    # a GPU holds DeepSpeed's whole reduce buffer (5e8 elements), however small the model
    assert deepspeed_sizes["grads"] == 194 * 2 + ZERO_BUCKETS_GPU["reduce"] * 2
    assert zero2_bf16_gpu["optimizer"] == (8 * 388 + 4 * 388) / 2
    torch_fp32 = learner_memory(
        TOY, lm_head=True, dtype="float32", ranks=1, zero_stage=0, engine="torch",
        offload_optimizer=False, offload_params=False, micro_batch=2, seq_len=5, response_len=3,
        checkpointing=False, on_gpu=False,
    )  # fmt: skip
    assert torch_fp32["optimizer"] == 8 * 388  # no master copy, no partition
    assert torch_fp32["grads"] == 388 * 4 + 2 * 4 * 10 * 4  # + AdamW's temporaries of the embedding


def test_scorer_and_rollout_memory_by_hand():
    ref = scorer_memory(
        TOY, lm_head=True, dtype="bfloat16", rows=2, seq_len=5, response_len=3, on_gpu=False
    )
    # the larger of one layer (10 tokens x 60 x 2 B) and the head on the 2 x 3 response
    # positions (bf16 logits, their fp32 cast, the fp32 log-softmax), + the last hidden states
    assert ref["activations"] == max(60 * 10 * 2, 6 * 10 * (2 + 4 + 4)) + 10 * 4 * 2
    assert ref["params"] == 388 * 2 and ref["overhead"] == CPU_OVERHEAD_BYTES
    wide = dataclasses.replace(TOY, vocab=1000)
    many = scorer_memory(
        wide, lm_head=True, dtype="float32", rows=400, seq_len=5, response_len=4, on_gpu=True
    )
    # 1600 response positions: the head runs on one chunk of them at a time
    assert many["activations"] == HEAD_CHUNK_TOKENS * 1000 * (4 + 4) + 2000 * 4 * 4
    assert many["overhead"] == 1e9
    rollout = rollout_memory(TOY, dtype="bfloat16", rows=3, seq_len=5, on_gpu=False)
    # K and V: 2 x 2 layers x kv_dim 2 x 3 rows x 5 positions x 2 bytes
    assert rollout["kv_cache"] == 2 * 2 * 2 * 3 * 5 * 2
    assert rollout["params"] == 388 * 2


def test_memory_problems_name_the_role_and_the_gigabytes():
    from rlhf_ray.models.memory import Estimate

    big = Estimate({"params": 20e9, "optimizer": 10e9}, "x")
    problems = memory_problems({"policy": big, "value": "unknown"}, {"policy": 1.0}, 24.0)
    assert len(problems) == 1
    assert "policy needs ~30.0 GB" in problems[0] and "24 GB" in problems[0]
    assert memory_problems({"policy": big}, {"policy": 0.0}, 24.0) == []  # a CPU role
    assert memory_problems({"policy": big}, {"policy": 1.0}, None) == []  # memory unknown


def test_plan_refuses_an_8b_policy_on_one_24gb_gpu(tmp_path, capsys):
    (tmp_path / "llama8b").mkdir()
    (tmp_path / "llama8b" / "config.json").write_text(json.dumps(LLAMA_8B))
    args = [
        "plan", f"policy.model.path={tmp_path / 'llama8b'}", "policy.model.dtype=bfloat16",
        "policy.num_ranks=1", "policy.num_gpus_per_rank=1", "ppo.minibatch_size=4",
        "rollout.batch_size=8", "cluster.nodes=[{cpus: 8, gpus: 1, gpu_memory_gb: 24}]",
    ]  # fmt: skip
    assert main(args) == 1
    out = capsys.readouterr()
    assert "policy needs ~" in out.err and "24 GB" in out.err
    # params 16 GB + fp32 master and Adam 96 GB + the step's bf16, fp32 and temporary grads 80 GB
    needed = float(out.err.split("policy needs ~")[1].split(" GB")[0])
    assert 128 < needed < 200
    policy_row = next(line for line in out.out.splitlines() if line.startswith("policy"))
    assert float(policy_row.split()[6]) == pytest.approx(needed, abs=0.1)  # the GB/device column

    # the same model with ZeRO-3 over 8 GPUs of 80 GB, offload and checkpointing fits
    fits = [*args[:-1], "policy.num_ranks=8", "policy.zero_stage=3", "ppo.minibatch_size=8",
            "policy.offload_optimizer=true", "policy.gradient_checkpointing=true",
            "cluster.nodes=[{cpus: 96, gpus: 8, gpu_memory_gb: 80}]"]  # fmt: skip
    assert main(fits) == 0, capsys.readouterr().err
