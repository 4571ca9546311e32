"""The processed distribution (temperature, top-k, top-p) the sampler and the learner share, on
a 4-token vocabulary with probabilities 0.1, 0.2, 0.3, 0.4 worked out by hand."""

from __future__ import annotations

import math

import torch

from rlhf_ray.algo import (
    entropy_of_logprobs,
    entropy_of_scores,
    inverse_cdf_sample,
    label_logprobs,
    process_logits,
    row_uniforms,
)

LOGITS = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
NEG = float("-inf")


def probs(scores: torch.Tensor) -> list[float]:
    return torch.softmax(scores, -1)[0].tolist()


def test_top_k_keeps_the_k_best_and_renormalises():
    out = process_logits(LOGITS, top_k=2)
    assert out[0, :2].tolist() == [NEG, NEG]
    torch.testing.assert_close(torch.tensor(probs(out)), torch.tensor([0, 0, 3 / 7, 4 / 7]))


def test_top_p_keeps_the_smallest_set_reaching_p():
    # ascending cumulative mass 0.1, 0.3, 0.6, 1.0: top_p=0.6 drops mass <= 0.4 (0.1 and 0.2)
    torch.testing.assert_close(
        torch.tensor(probs(process_logits(LOGITS, top_p=0.6))), torch.tensor([0, 0, 3 / 7, 4 / 7])
    )
    # top_p=0.75 drops mass <= 0.25: only 0.1
    torch.testing.assert_close(
        torch.tensor(probs(process_logits(LOGITS, top_p=0.75))),
        torch.tensor([0, 2 / 9, 3 / 9, 4 / 9]),
    )


def test_temperature_comes_before_the_filters():
    # at temperature 2 the probabilities are sqrt(p) / sum: 0.316, 0.447, 0.548, 0.632 (/1.943),
    # i.e. 0.163, 0.230, 0.282, 0.325; ascending cumulative 0.163, 0.393, ...: top_p=0.7 drops
    # mass <= 0.3, so only the first token (it would drop two at temperature 1).
    root = torch.tensor([0.1, 0.2, 0.3, 0.4]).sqrt()
    out = process_logits(LOGITS, temperature=2.0, top_p=0.7)
    expected = torch.cat([torch.zeros(1), root[1:] / root[1:].sum()])
    torch.testing.assert_close(torch.tensor(probs(out)), expected)
    torch.testing.assert_close(out[0, 1:], LOGITS[0, 1:] / 2)


def test_label_outside_the_set_is_counted_and_kept_finite():
    scaled = LOGITS
    processed = process_logits(LOGITS, top_k=2)
    logprobs, outside = label_logprobs(
        scaled.expand(2, 4), processed.expand(2, 4), torch.tensor([3, 0])
    )
    # token 3 inside: 0.4 / 0.7; token 0 outside: put back, 0.1 / (0.1 + 0.3 + 0.4)
    torch.testing.assert_close(logprobs, torch.tensor([math.log(4 / 7), math.log(1 / 8)]))
    assert outside.tolist() == [False, True]


def test_entropy_ignores_filtered_tokens_and_has_finite_gradients():
    scores = process_logits(LOGITS, top_k=2).requires_grad_()
    entropy = entropy_of_scores(scores)
    expected = -(3 / 7 * math.log(3 / 7) + 4 / 7 * math.log(4 / 7))
    torch.testing.assert_close(entropy, torch.tensor([expected]))
    assert entropy.item() <= math.log(2)
    entropy.sum().backward()
    assert scores.grad is not None and torch.isfinite(scores.grad).all()
    assert scores.grad[0, :2].tolist() == [0.0, 0.0]


def test_uniform_rows_depend_on_their_own_generator_only():
    def gen(seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    pair = row_uniforms([gen(1), gen(2)], 5)
    alone = row_uniforms([gen(2)], 5)
    assert pair.shape == (2, 5) and pair.dtype == torch.float64
    assert torch.equal(pair[1], alone[0]) and not torch.equal(pair[0], pair[1])
    assert ((pair >= 0) & (pair < 1)).all()


def test_inverse_cdf_picks_the_token_whose_interval_holds_u_and_never_a_filtered_one():
    # probabilities 0.5, 0 (filtered), 0.25, 0.25: cumulative 0.5, 0.5, 0.75, 1.0
    logp = torch.log(torch.tensor([[0.5, 0.0, 0.25, 0.25]])).expand(5, 4)
    u = torch.tensor([0.0, 0.49, 0.51, 0.8, 0.999999], dtype=torch.float64)
    assert inverse_cdf_sample(logp, u).squeeze(-1).tolist() == [0, 0, 2, 3, 3]
    # a row's pick depends on its own row only
    mixed = torch.stack([logp[0], torch.log(torch.tensor([0.0, 0.0, 0.0, 1.0]))])
    assert inverse_cdf_sample(mixed, u[[3, 0]]).squeeze(-1).tolist() == [3, 3]


def test_entropy_of_logprobs_is_that_of_their_scores():
    """From a log-softmax: 0.5, 0.5 and a filtered 0 give log 2; the same figure as
    ``entropy_of_scores`` of the scores, filtered or not."""
    half = torch.log(torch.tensor([[0.5, 0.5, 0.0]]))
    torch.testing.assert_close(entropy_of_logprobs(half), torch.tensor([math.log(2)]))
    for scores in (LOGITS / 0.7, process_logits(LOGITS, top_k=2)):
        logprobs = torch.log_softmax(scores, -1)
        torch.testing.assert_close(entropy_of_logprobs(logprobs), entropy_of_scores(scores))
