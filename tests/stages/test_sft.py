"""sft end to end (in-process): the reply-token loss falls and the saved model loads with plain
transformers, which measures the same reply-token loss the run logged."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_ray.config.ppo import ModelSpec
from rlhf_ray.config.stages import load_sft_config
from rlhf_ray.data.tokenization import TiktokenTokenizer
from rlhf_ray.models import build_causal_lm
from rlhf_ray.observe.metrics import read_metrics
from rlhf_ray.stages import run_sft, sft_role
from rlhf_ray.workers.inprocess import InProcessStage

WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "green",
    "quiet",
    "table",
    "window",
    "garden",
    "light",
    "music",
    "paper",
]


def sft_rows(n: int, seed: int) -> list[dict]:
    """Replies repeat the prompt's words: learnable, and prompt tokens differ from reply ones."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4)))
        rows.append({"prompt": f"Repeat: {words}", "response": words})
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def sft_overrides(tmp_path, train_rows, eval_rows) -> list[str]:
    return [
        f"data.path={write_jsonl(tmp_path / 'train.jsonl', train_rows)}",
        f"data.eval_path={write_jsonl(tmp_path / 'eval.jsonl', eval_rows)}",
        "data.eval_fraction=0",
        "data.max_tokens=96",
        "data.max_prompt_tokens=64",
        "learner.engine=torch",
        "learner.num_ranks=1",
        "train.epochs=2",
        "train.batch_size=16",
        "optim.lr=3e-3",
        "logging.progress=false",
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft")
    eval_rows = sft_rows(24, seed=1)
    cfg = load_sft_config(None, sft_overrides(tmp, sft_rows(96, seed=0), eval_rows))
    workers = InProcessStage(sft_role(cfg), cfg.train.dist_timeout_s)
    try:
        result = run_sft(cfg, workers, tmp / "run")
    finally:
        workers.close()
    return result, eval_rows


def reply_nll(model, tok, rows) -> float:
    """Mean NLL of the reply tokens (and EOS) under ``model``, one unpadded row at a time."""
    total, count = 0.0, 0
    for r in rows:
        prompt = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}],
                                         tokenize=False, add_generation_prompt=True)  # fmt: skip
        prompt_ids = tok(prompt)["input_ids"]
        ids = prompt_ids + tok(" " + r["response"])["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        reply = logp[len(prompt_ids) - 1 :]
        total, count = total - float(reply.sum()), count + len(reply)
    return total / count


def test_saved_model_loads_and_has_a_lower_reply_loss_than_the_start(trained):
    result, eval_rows = trained
    tok = AutoTokenizer.from_pretrained(result.output)
    model = AutoModelForCausalLM.from_pretrained(result.output).eval()
    start = build_causal_lm(ModelSpec(), TiktokenTokenizer.byte_level())  # the preset it began as
    after, before = reply_nll(model, tok, eval_rows), reply_nll(start, tok, eval_rows)
    assert after < 0.7 * before, (before, after)
    # the logged eval loss is this reply-token loss: prompt tokens are not in it
    assert result.final["eval/loss"] == pytest.approx(after, rel=1e-4)


def test_metrics_rows_and_falling_loss(trained):
    result, _ = trained
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    steps = [r for r in rows if "train/loss" in r]
    epochs = [r for r in rows if "epoch/train_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))  # 96 // 16 = 6 steps x 2 epochs
    assert [r["epoch"] for r in epochs] == [0, 1]
    assert epochs[1]["eval/loss"] < epochs[0]["eval/loss"] < steps[0]["train/loss"]
    assert (result.run_dir / "config.yaml").exists()


def test_the_epoch_end_pass_over_the_train_split_can_be_skipped(tmp_path):
    overrides = sft_overrides(tmp_path, sft_rows(32, seed=0), sft_rows(8, seed=1))
    cfg = load_sft_config(None, [*overrides, "train.epochs=1", "train.eval_train_split=false"])
    workers = InProcessStage(sft_role(cfg), cfg.train.dist_timeout_s)
    try:
        result = run_sft(cfg, workers, tmp_path / "run")
    finally:
        workers.close()
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    assert not any(k.startswith("epoch/train_") for r in rows for k in r)
    assert "eval/loss" in rows[-1] and "eval/loss" in result.final  # the held-out pass stays
