"""Sampling responses: fixed width, EOS truncation, seeding, left padding, and the
sampler/learner log-probability parity PPO's importance ratios depend on."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GenerationConfig

from rlhf_ray.algo import truncate_after_eos
from rlhf_ray.config.ppo import ModelSpec, TokenizerConfig
from rlhf_ray.data.tokenization import build_tokenizer
from rlhf_ray.engines.generation import SamplingParams, sample_responses
from rlhf_ray.models import build_causal_lm, response_logprobs

PRESETS = ["gpt2-tiny", "llama-tiny"]
PROMPTS = [
    "Tell me a story about",
    "Hi",
    "What is the capital of France?",
    "ok",
    "Once upon",
    "Why is the sky blue",
    "x",
    "Write a poem",
]
R = 12


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(TokenizerConfig())


@pytest.fixture(scope="module")
def prompts(tok):
    ids, mask = tok.encode_batch_left_padded(PROMPTS, max_length=64)
    assert (mask == 0).any()
    return ids, mask


def eos_prone(model: nn.Module, eos_id: int, eos_logit: float) -> nn.Module:
    """Give the output layer a bias that makes EOS likely (~10% per token at 3.4 with the
    258-token byte vocab), so that some rows end early and some never do."""
    old = model.get_output_embeddings()
    head = nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[eos_id] = eos_logit
    model.set_output_embeddings(head)
    return model


def build(tok, preset: str, eos_logit: float = 3.4) -> nn.Module:
    spec = ModelSpec(preset=preset, hidden_size=32, num_layers=2, num_heads=4, init_seed=3)
    return eos_prone(build_causal_lm(spec, tok), tok.eos_id, eos_logit)


@pytest.fixture(scope="module", params=PRESETS)
def model(request, tok):
    return build(tok, request.param)


def sample(model, tok, prompts, seed=0, greedy=False, seeds=None, **params):
    """Row ``i`` seeded by ``seed * 1000 + i`` (or ``seeds[i]``), greedy if asked."""
    ids, mask = prompts
    if seeds is None:
        seeds = [seed * 1000 + i for i in range(len(ids))]
    return sample_responses(
        model,
        ids,
        mask,
        SamplingParams(**{"max_new_tokens": R, **params}),
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
        seeds=None if greedy else seeds,
    )


def test_responses_are_truncated_after_the_first_eos(model, tok, prompts):
    out = sample(model, tok, prompts)
    ids, mask, has_eos = out["response_ids"], out["response_mask"], out["has_eos"]
    assert ids.shape == mask.shape == out["sampler_logprobs"].shape == (len(PROMPTS), R)
    assert has_eos.any() and not has_eos.all()  # both kinds of rows are exercised
    for row in range(len(PROMPTS)):
        eos = (ids[row] == tok.eos_id).nonzero().flatten()
        if has_eos[row]:
            first = int(eos[0])
            assert len(eos) == 1  # nothing after the first EOS survives
            assert (ids[row, first + 1 :] == tok.pad_id).all()
            assert mask[row].tolist() == [1] * (first + 1) + [0] * (R - first - 1)
        else:
            assert len(eos) == 0
            assert mask[row].tolist() == [1] * R
    again = truncate_after_eos(ids, tok.eos_id, tok.pad_id)
    torch.testing.assert_close(again[0], ids)
    torch.testing.assert_close(again[1], mask)
    assert again[2].tolist() == has_eos.tolist()
    assert (out["sampler_logprobs"][mask == 0] == 0).all()
    assert (out["sampler_logprobs"][mask == 1] < 0).all()


def test_width_is_max_new_tokens_even_when_every_row_stops_early(tok, prompts):
    model = build(tok, "gpt2-tiny", eos_logit=50.0)  # EOS first, every row
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    out = sample(model, tok, prompts)
    assert len(forwards) == 1  # generation stopped once every row had ended
    assert out["response_ids"].shape == (len(PROMPTS), R)
    assert (out["response_ids"][:, 0] == tok.eos_id).all()
    assert (out["response_ids"][:, 1:] == tok.pad_id).all()
    assert out["response_mask"].sum(1).tolist() == [1] * len(PROMPTS)
    assert out["has_eos"].all()
    assert (out["sampler_logprobs"][:, 1:] == 0).all()
    torch.testing.assert_close(
        out["sampler_logprobs"][:, 0], torch.zeros(len(PROMPTS)), rtol=0, atol=1e-6
    )  # p(EOS) ~ 1


def test_sampling_is_seeded(model, tok, prompts):
    a = sample(model, tok, prompts, seed=11)
    b = sample(model, tok, prompts, seed=11)
    c = sample(model, tok, prompts, seed=12)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert not torch.equal(a["response_ids"], c["response_ids"])


def test_sampling_leaves_the_global_rng_alone(model, tok, prompts):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    sample(model, tok, prompts, seed=0)
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)


def test_greedy_batch_equals_each_prompt_alone(model, tok, prompts):
    batch = sample(model, tok, prompts, greedy=True)
    for row, text in enumerate(PROMPTS):
        ids = torch.tensor([tok.encode(text)])
        alone = sample(model, tok, (ids, torch.ones_like(ids)), greedy=True)
        assert batch["response_ids"][row].tolist() == alone["response_ids"][0].tolist(), text
        assert batch["response_mask"][row].tolist() == alone["response_mask"][0].tolist()
        torch.testing.assert_close(
            batch["sampler_logprobs"][row], alone["sampler_logprobs"][0], rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=1.0),
        dict(temperature=0.7, top_k=20),
        dict(temperature=1.3, top_p=0.9),
    ],
    ids=["t1", "t0.7-topk", "t1.3-topp"],
)
def test_sampler_logprobs_match_the_learner(model, tok, prompts, params):
    prompt_ids, prompt_mask = prompts
    out = sample(model, tok, prompts, seed=4, **params)
    input_ids = torch.cat([prompt_ids, out["response_ids"]], 1)
    attention_mask = torch.cat([prompt_mask, out["response_mask"]], 1)
    with torch.no_grad():
        learner, _ = response_logprobs(
            model, input_ids, attention_mask, prompt_ids.shape[1], **params
        )
    valid = out["response_mask"].bool()
    torch.testing.assert_close(out["sampler_logprobs"][valid], learner[valid], rtol=0, atol=1e-5)


def test_a_rows_sample_depends_on_its_seed_not_on_its_batch_mates(model, tok, prompts):
    """Per-row generators: rows 2-5 sampled in the whole batch, or alone in another order
    beside other rows, draw the same tokens with the same log-probs."""
    ids, mask = prompts
    seeds = [101, 102, 103, 104, 105, 106, 107, 108]
    whole = sample(model, tok, prompts, seeds=seeds, top_k=20)
    order = [5, 3, 2, 4]
    part = sample(model, tok, (ids[order], mask[order]), seeds=[seeds[i] for i in order], top_k=20)
    assert whole["response_ids"][order].tolist() == part["response_ids"].tolist()
    torch.testing.assert_close(
        whole["sampler_logprobs"][order], part["sampler_logprobs"], rtol=0, atol=1e-5
    )
    chunked = sample_responses(model, ids, mask, SamplingParams(R, top_k=20), tok.eos_id,
                               tok.pad_id, seeds, chunk_rows=3)  # fmt: skip
    assert torch.equal(chunked["response_ids"], whole["response_ids"])


def test_samples_follow_the_processed_distribution(tok):
    """4000 rows of one prompt, one token each: only the top-3 tokens appear (top_k=3), at the
    frequencies of the renormalised top-3 probabilities at temperature 0.8."""
    model = build(tok, "gpt2-tiny", eos_logit=0.0)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(25.0)  # a peaked first-token distribution
    ids = torch.tensor([tok.encode("Hello")] * 4000)
    out = sample(model, tok, (ids, torch.ones_like(ids)), seed=7, max_new_tokens=1,
                 temperature=0.8, top_k=3)  # fmt: skip
    with torch.no_grad():
        logits = model(input_ids=ids[:1]).logits[0, -1] / 0.8
    top = torch.topk(logits, 3)
    expected = torch.softmax(top.values, -1)
    drawn = out["response_ids"][:, 0]
    assert set(drawn.tolist()) <= set(top.indices.tolist())
    freq = torch.stack([(drawn == t).float().mean() for t in top.indices])
    torch.testing.assert_close(freq, expected, rtol=0, atol=0.03)  # ~4 sigma at n=4000
    torch.testing.assert_close(out["sampler_logprobs"][:, 0].exp(),
                               expected[(drawn[:, None] == top.indices).float().argmax(-1)],
                               rtol=0, atol=1e-5)  # fmt: skip


def test_the_models_own_generation_config_is_set_aside_and_restored(model, tok, prompts):
    clean = sample(model, tok, prompts, seed=2)
    shipped = GenerationConfig(repetition_penalty=1.5, no_repeat_ngram_size=2, num_beams=2)
    saved, model.generation_config = model.generation_config, shipped
    try:
        leaked = sample(model, tok, prompts, seed=2)
        assert model.generation_config is shipped
    finally:
        model.generation_config = saved
    for key in clean:
        assert torch.equal(clean[key], leaked[key]), key


def test_temperature_changes_sampler_logprobs(model, tok, prompts):
    cold = sample(model, tok, prompts, greedy=True, temperature=1.0)
    hot = sample(model, tok, prompts, greedy=True, temperature=2.0)
    assert torch.equal(cold["response_ids"], hot["response_ids"])  # greedy ignores temperature
    valid = cold["response_mask"].bool()
    assert not torch.allclose(cold["sampler_logprobs"][valid], hot["sampler_logprobs"][valid])
