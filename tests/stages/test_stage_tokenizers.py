"""Both stages with a local tiktoken file and with a Hugging Face BPE: sft saves its tokenizer,
train-rm started from the SFT directory picks it up, and the saved reward model scores text
through plain transformers as training did."""

from __future__ import annotations

import pytest
import torch
from test_reward_model import plain_transformers_scores, preference_rows, write_jsonl
from test_sft import sft_rows
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from rlhf_ray.config.ppo import TokenizerConfig
from rlhf_ray.config.stages import load_rm_config, load_sft_config, stage_tokenizer
from rlhf_ray.data.tokenization import build_tokenizer, write_tiktoken_bpe
from rlhf_ray.stages import rm_role, run_sft, run_train_rm, sft_role
from rlhf_ray.workers.inprocess import InProcessStage

COMMON = ["learner.engine=torch", "learner.num_ranks=1", "train.epochs=1", "train.batch_size=8",
          "data.max_tokens=96", "data.max_prompt_tokens=64", "logging.progress=false"]  # fmt: skip


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def tiktoken_file(tmp_path) -> str:
    """A local .tiktoken file: the 256 bytes plus a few merges."""
    ranks = {bytes([i]): i for i in range(256)}
    for pair in (b"ap", b"pl", b"le", b"er", b"on", b" s"):
        ranks[pair] = len(ranks)
    path = tmp_path / "tiny.tiktoken"
    write_tiktoken_bpe(ranks, path)
    return str(path)


def hf_dir(tmp_path) -> str:
    """A byte-level BPE trained here, saved as a Hugging Face tokenizer directory."""
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    rows = preference_rows(50, seed=5)
    backend.train_from_iterator([r["prompt"] + " " + r["chosen"] for r in rows], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    tok.save_pretrained(tmp_path / "hf_tok")
    return str(tmp_path / "hf_tok")


def run(stage, cfg, run_dir):
    role, fn = (sft_role, run_sft) if stage == "sft" else (rm_role, run_train_rm)
    workers = InProcessStage(role(cfg), cfg.train.dist_timeout_s)
    try:
        return fn(cfg, workers, run_dir), (workers.scores("eval") if stage == "rm" else None)
    finally:
        workers.close()


@pytest.mark.parametrize("kind", ["tiktoken", "hf"])
def test_sft_then_train_rm_with_the_tokenizer_kind(tmp_path, kind):
    name = tiktoken_file(tmp_path) if kind == "tiktoken" else hf_dir(tmp_path)
    tokenizer = TokenizerConfig(kind=kind, name_or_path=name)
    sft_data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(24, seed=0))
    sft_cfg = load_sft_config(None, [*COMMON, f"data.path={sft_data}", f"tokenizer.kind={kind}",
                                     f"tokenizer.name_or_path={name}"])  # fmt: skip
    sft, _ = run("sft", sft_cfg, tmp_path / "sft")

    eval_rows = preference_rows(8, seed=1)
    rm_cfg = load_rm_config(None, [
        *COMMON, f"model.path={sft.output}", "data.eval_fraction=0",
        f"data.path={write_jsonl(tmp_path / 'train.jsonl', preference_rows(24, seed=0))}",
        f"data.eval_path={write_jsonl(tmp_path / 'eval.jsonl', eval_rows)}",
    ])  # fmt: skip
    assert stage_tokenizer(rm_cfg) == TokenizerConfig(kind="hf", name_or_path=str(sft.output))
    rm, (chosen, rejected) = run("rm", rm_cfg, tmp_path / "rm")

    # the tokenizer saved with each model encodes as the one the pipeline started with
    text = "\n\nHuman: Tell me about apple.\n\nAssistant: river stone<|endoftext|>"
    want = build_tokenizer(tokenizer).encode(text)
    for directory in (sft.output, rm.output):
        assert AutoTokenizer.from_pretrained(directory)(text)["input_ids"] == want
    plain_chosen, plain_rejected = plain_transformers_scores(rm.output, eval_rows)
    torch.testing.assert_close(plain_chosen, chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(plain_rejected, rejected, atol=1e-5, rtol=0)
