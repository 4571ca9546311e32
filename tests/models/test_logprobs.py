"""Token log-probabilities of responses after left-padded prompts (transformers 5 does not
derive positions from the mask in a plain forward, so ours pass them explicitly)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_ray.config.ppo import ModelSpec, TokenizerConfig
from rlhf_ray.data.tokenization import build_tokenizer
from rlhf_ray.models import (
    build_causal_lm,
    last_token_index,
    position_ids_from_mask,
    response_logprobs,
)


def logprobs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """The reference: ``logits (B, T, V)``, ``labels (B, T)`` -> ``(B, T)`` log p(label) at that
    temperature, from the whole logits at once (the package chunks them)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


PROMPTS = ["Tell me a story", "Hi", "What is the capital of France?"]
R = 5


def test_position_ids_left_padded():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    expected = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]])
    torch.testing.assert_close(position_ids_from_mask(mask), expected)


def test_position_ids_left_padded_prompt_then_response_with_trailing_pads():
    # prompt (left-padded) + response (pad after EOS): real tokens count 0, 1, 2, ...
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    pos = position_ids_from_mask(mask)
    assert pos[0, 1:5].tolist() == [0, 1, 2, 3]
    assert pos[1].tolist() == [0, 1, 2, 3, 4, 5]
    assert pos.min() >= 0


def test_position_ids_accept_bool_masks():
    mask = torch.tensor([[False, True, True]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 1]]


def test_last_token_index_left_and_right_padded():
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    both = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 1, 1, 0]])  # left prompt pad + response pad
    assert last_token_index(left).tolist() == [4, 4, 4]
    assert last_token_index(right).tolist() == [2, 0, 4]
    assert last_token_index(both).tolist() == [2, 3]


def test_logprobs_from_logits_hand_example():
    # probabilities 1/6, 2/6, 3/6 at temperature 1
    logits = torch.log(torch.tensor([[[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]]))
    labels = torch.tensor([[2, 1]])
    out = logprobs_from_logits(logits, labels)
    torch.testing.assert_close(out, torch.tensor([[math.log(0.5), math.log(2 / 6)]]))
    # temperature 2 divides the logits: probabilities ~ sqrt(1), sqrt(2), sqrt(3)
    hot = logprobs_from_logits(logits, labels, temperature=2.0)
    z = 1 + math.sqrt(2) + math.sqrt(3)
    torch.testing.assert_close(
        hot, torch.tensor([[math.log(math.sqrt(3) / z), math.log(math.sqrt(2) / z)]])
    )


def test_logprobs_from_logits_equals_log_softmax_gather():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=g)
    labels = torch.randint(0, 7, (2, 3), generator=g)
    expected = torch.log_softmax(logits / 0.7, -1).gather(-1, labels[..., None])[..., 0]
    torch.testing.assert_close(logprobs_from_logits(logits, labels, 0.7), expected)
    assert logprobs_from_logits(logits.bfloat16(), labels).dtype == torch.float32


# ------------------------------------------------------------------------- under a model


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(TokenizerConfig())


@pytest.fixture(scope="module", params=["gpt2-tiny", "llama-tiny"])
def model(request, tok):
    spec = ModelSpec(preset=request.param, hidden_size=32, num_layers=2, num_heads=4, init_seed=1)
    return build_causal_lm(spec, tok)


@pytest.fixture(scope="module")
def batch(tok):
    """Left-padded prompts + responses; row 1's response ends at an EOS, then pads."""
    prompt_ids, prompt_mask = tok.encode_batch_left_padded(PROMPTS, max_length=64)
    g = torch.Generator().manual_seed(0)
    response_ids = torch.randint(32, 127, (len(PROMPTS), R), generator=g)
    response_mask = torch.ones_like(response_ids)
    response_ids[1, 2] = tok.eos_id
    response_ids[1, 3:] = tok.pad_id
    response_mask[1, 3:] = 0
    input_ids = torch.cat([prompt_ids, response_ids], 1)
    attention_mask = torch.cat([prompt_mask, response_mask], 1)
    assert (prompt_mask == 0).any()  # the batch really is left-padded
    return input_ids, attention_mask, prompt_ids.shape[1], response_mask


def _row_alone(model, ids: torch.Tensor, prompt_len: int, temperature: float) -> torch.Tensor:
    """log p(response token) for one unpadded row, by hand: logits at t predict token t+1."""
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0].float()
    logp = torch.log_softmax(logits / temperature, -1)
    targets = ids[prompt_len:]
    return logp[prompt_len - 1 : -1].gather(-1, targets[:, None])[:, 0]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_left_padded_batch_equals_rows_computed_alone(model, batch, temperature):
    input_ids, attention_mask, prompt_len, response_mask = batch
    with torch.no_grad():
        logprobs, entropy = response_logprobs(
            model, input_ids, attention_mask, prompt_len, temperature
        )
    assert logprobs.shape == response_mask.shape
    assert entropy is None
    for row in range(len(PROMPTS)):
        real = input_ids[row, attention_mask[row].bool()]
        n_prompt = int(attention_mask[row, :prompt_len].sum())
        expected = _row_alone(model, real, n_prompt, temperature)
        valid = response_mask[row].bool()
        torch.testing.assert_close(logprobs[row, valid], expected, rtol=1e-5, atol=1e-5)


def test_positions_matter_for_this_batch(tok, batch):
    """Without position ids GPT-2's padded rows move, so the test above can tell the difference.
    (Llama's rotary positions are relative: a constant shift leaves them unchanged.)"""
    model = build_causal_lm(ModelSpec(hidden_size=32, num_layers=2, num_heads=4, init_seed=1), tok)
    input_ids, attention_mask, prompt_len, response_mask = batch
    with torch.no_grad():
        right, _ = response_logprobs(model, input_ids, attention_mask, prompt_len)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    naive = logprobs_from_logits(logits[:, prompt_len - 1 : -1], input_ids[:, prompt_len:])
    assert not torch.allclose(naive * response_mask, right * response_mask, atol=1e-4)


def test_temperature_changes_response_logprobs(model, batch):
    input_ids, attention_mask, prompt_len, response_mask = batch
    with torch.no_grad():
        cold, _ = response_logprobs(model, input_ids, attention_mask, prompt_len, 1.0)
        hot, _ = response_logprobs(model, input_ids, attention_mask, prompt_len, 2.0)
    valid = response_mask.bool()
    assert not torch.allclose(cold[valid], hot[valid], atol=1e-3)


def test_entropy_is_that_of_the_temperature_scaled_distribution(model, batch):
    input_ids, attention_mask, prompt_len, _ = batch
    with torch.no_grad():
        _, entropy = response_logprobs(
            model, input_ids, attention_mask, prompt_len, 0.5, with_entropy=True
        )
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
        ).logits
    logp = torch.log_softmax(logits[:, prompt_len - 1 : -1] / 0.5, -1)
    expected = -(logp.exp() * logp).sum(-1)
    assert entropy.shape == expected.shape
    torch.testing.assert_close(entropy, expected, rtol=1e-5, atol=1e-5)


def _full_logits(model, input_ids, attention_mask, prompt_len):
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask))  # fmt: skip
    return out.logits[:, prompt_len - 1 : -1].float()


def test_filtered_logprobs_follow_the_processed_distribution_kl_and_entropy_the_full_one(
    model, batch
):
    """top_k=2: each token's log-prob is taken among its row's 2 best tokens; a label outside
    those 2 is counted and gets a finite log-prob. The entropy and ``full`` (what the KL uses)
    are those of the whole temperature-scaled distribution."""
    input_ids, attention_mask, prompt_len, _ = batch
    input_ids = input_ids.clone()
    with torch.no_grad():  # make each row's first response token its best one
        first = _full_logits(model, input_ids, attention_mask, prompt_len)[:, 0].argmax(-1)
    input_ids[:, prompt_len] = first
    outside: list[torch.Tensor] = []
    full: list[torch.Tensor] = []
    with torch.no_grad():
        logprobs, entropy = response_logprobs(
            model,
            input_ids,
            attention_mask,
            prompt_len,
            0.7,
            with_entropy=True,
            top_k=2,
            outside=outside,
            full=full,
        )
        logits = _full_logits(model, input_ids, attention_mask, prompt_len) / 0.7
    top2 = torch.topk(logits, 2).indices
    labels = input_ids[:, prompt_len:]
    inside = (top2 == labels[..., None]).any(-1)
    assert torch.equal(outside[0], ~inside) and inside.any() and (~inside).any()
    kept = logits.gather(-1, top2)
    expected = torch.log_softmax(kept, -1)[..., 0]  # where the label is the best token
    best = top2[..., 0] == labels
    torch.testing.assert_close(logprobs[best], expected[best], rtol=0, atol=1e-5)
    assert torch.isfinite(logprobs).all()
    full_logp = torch.log_softmax(logits, -1)
    expected_full = full_logp.gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(full[0], expected_full, rtol=0, atol=1e-5)
    assert entropy is not None
    torch.testing.assert_close(entropy, -(full_logp.exp() * full_logp).sum(-1), rtol=0, atol=1e-4)
    assert (entropy > math.log(2) + 0.1).any()  # not the filtered one's (at most log 2)


@pytest.mark.parametrize("top", [dict(), dict(top_k=20, top_p=0.9)], ids=["plain", "filtered"])
def test_chunked_logprobs_entropy_and_gradients_equal_unchunked(model, batch, top):
    """Three tokens per chunk (activation-checkpointed) against one chunk for everything."""
    input_ids, attention_mask, prompt_len, mask = batch
    results = []
    for chunk in (3, 10_000):
        model.zero_grad()
        logprobs, entropy = response_logprobs(model, input_ids, attention_mask, prompt_len, 0.8,
                                              with_entropy=True, chunk_tokens=chunk, **top)  # fmt: skip
        ((logprobs * mask).sum() + (entropy * mask).sum()).backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results.append((logprobs.detach(), entropy.detach(), grads))
    (lp_a, ent_a, g_a), (lp_b, ent_b, g_b) = results
    torch.testing.assert_close(lp_a, lp_b, rtol=1e-6, atol=1e-6)  # matmul shapes differ
    torch.testing.assert_close(ent_a, ent_b, rtol=1e-6, atol=1e-6)
    assert len(g_a) == len(g_b) > 0
    for a, b in zip(g_a, g_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    model.zero_grad()


def test_entropy_carries_no_graph_when_its_coefficient_is_zero(model, batch):
    input_ids, attention_mask, prompt_len, _ = batch
    logprobs, entropy = response_logprobs(model, input_ids, attention_mask, prompt_len,
                                          with_entropy=True, entropy_grad=False)  # fmt: skip
    assert logprobs.requires_grad and entropy is not None and not entropy.requires_grad
    _, with_graph = response_logprobs(model, input_ids, attention_mask, prompt_len,
                                      with_entropy=True)  # fmt: skip
    assert with_graph is not None and with_graph.requires_grad
