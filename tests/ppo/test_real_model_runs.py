"""The real-model tier: the PPO pipeline on SmolLM2-135M-Instruct (builtin, converted once per
CI run by the session fixture ``real_model_dir``), 2 rounds on each rollout backend, checking
what a real tokenizer, chat template and tied-embedding Llama expose:

- the chat template writes ``<|im_start|>``, which is also the BOS: no prompt starts with two;
- generation stops at ``<|im_end|>`` (the EOS), kept as the response's last real token, and the
  pad is a token of its own, so the mask never drops a real final EOS;
- tied embeddings survive ZeRO-3, the checkpoint and a resume from it, the weight sync (HF and
  vLLM: the post-sync check passes every round) and the export;
- the post-sync check and the sampler/learner log-prob gap stay within the fp32 thresholds.

The runs go through ``jobs/arithmetic_cpu.yaml`` made small (4 prompts x 2 samples, 12 new
tokens) and in process, so each costs one start-up and two real rounds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.real, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SMALL = [
    "rollout.batch_size=4",
    "rollout.samples_per_prompt=2",
    "rollout.max_new_tokens=12",
    "ppo.minibatch_size=8",
    "logging.dump_rollouts_every=1",
    "logging.progress=false",
]
EOS, BOS = "<|im_end|>", "<|im_start|>"


def ppo(run_dir: Path, *overrides: str, resume: bool = False) -> None:
    cmd = [sys.executable, "-m", "rlhf_ray.cli", "ppo", "--in-process"]
    cmd += ["--config", str(REPO / "jobs" / "arithmetic_cpu.yaml"), "--run-dir", str(run_dir)]
    cmd += ["--resume"] if resume else []
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        cmd + SMALL + list(overrides), capture_output=True, text=True, env=env, timeout=1200
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def zero3_run(real_model_dir, tmp_path_factory) -> Path:
    """HF backend, the policy under DeepSpeed ZeRO-3: 2 rounds with a checkpoint after each,
    then a resume that runs a third round from the last checkpoint."""
    run = tmp_path_factory.mktemp("real") / "zero3"
    zero3 = ["policy.engine=deepspeed", "policy.zero_stage=3", "checkpoint.every=1"]
    ppo(run, *zero3, "train.rounds=2", "checkpoint.keep_last=1")
    ppo(run, *zero3, "train.rounds=3", "checkpoint.keep_last=1", resume=True)
    return run


@pytest.fixture(scope="module")
def vllm_run(real_model_dir, tmp_path_factory) -> Path:
    pytest.importorskip("vllm")
    run = tmp_path_factory.mktemp("real") / "vllm"
    ppo(run, "rollout.backend=vllm", "train.rounds=2")
    return run


def assert_sampling_checks(run: Path, rounds: int, tokenizer) -> None:
    metrics = rows(run)
    assert [r["round"] for r in metrics][-rounds:] == list(range(rounds))[-rounds:]
    for r in metrics:
        assert r["sync/logprob_max_abs_diff"] <= 0.01, r  # SYNC_TOLERANCE["float32"]
        assert abs(r["rollout/logprob_gap"]) <= 1e-3, r
    bos, eos = tokenizer.convert_tokens_to_ids([BOS, EOS])
    dumped = [
        json.loads(line)
        for path in sorted((run / "rollouts").glob("round_*.jsonl"))
        for line in path.read_text().splitlines()
    ]
    assert dumped
    for sample in dumped:
        ids = sample["prompt_ids"]
        assert ids[0] == bos and ids[1] != bos, ids[:4]  # the template's BOS, once
        assert sample["prompt"].count(BOS) == 3  # system, user, assistant: nothing prepended
        if sample["has_eos"]:  # the real EOS is the response's last real token, not masked
            assert sample["response_ids"][-1] == eos
            assert eos not in sample["response_ids"][:-1]
        else:
            assert eos not in sample["response_ids"]
    assert any(s["has_eos"] for s in dumped), "no response ended at <|im_end|>"


def assert_tied_export(model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_zero3_run_keeps_bos_eos_and_tied_embeddings_through_checkpoint_and_resume(
    zero3_run, real_model_dir
):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real_model_dir)
    assert_sampling_checks(zero3_run, 3, tokenizer)
    assert [r["round"] for r in rows(zero3_run)] == [0, 1, 2]  # round 2 after the resume
    assert_tied_export(zero3_run / "policy")
    checkpoints = sorted(zero3_run.glob("checkpoints/*/policy"))
    assert checkpoints, list(zero3_run.glob("checkpoints/*"))
    assert_tied_export(checkpoints[-1])


def test_exported_policy_is_the_trained_one_and_differs_from_the_base(zero3_run, real_model_dir):
    from safetensors.torch import load_file

    trained = load_file(str(next((zero3_run / "policy").glob("*.safetensors"))))
    base = load_file(str(next(Path(real_model_dir).glob("*.safetensors"))))
    name = "model.embed_tokens.weight"
    assert trained[name].shape[0] >= base[name].shape[0]
    moved = max(
        float((trained[k].float() - base[k].float()).abs().max())
        for k in base
        if k in trained and trained[k].shape == base[k].shape
    )
    assert moved > 0.0  # three rounds of updates reached the export
    assert torch.isfinite(trained[name]).all()


def test_vllm_run_syncs_the_tied_real_model_within_fp32_thresholds(vllm_run, real_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real_model_dir)
    assert_sampling_checks(vllm_run, 2, tokenizer)
    assert_tied_export(vllm_run / "policy")
