"""The policy objective at ``entropy_coef`` 0 (issue 34): its logged entropy is read off the
log-softmax the loss already took, and a single chunk of the LM head keeps its activations
instead of recomputing them. Neither may change what a step computes: the weights after one
AdamW step equal those of the loss computed the old way (head recomputed, no entropy)."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.algo import kl_loss, masked_mean, policy_loss
from rlhf_ray.config.ppo import ModelSpec, TokenizerConfig, load_config
from rlhf_ray.data.tokenization import build_tokenizer
from rlhf_ray.models import build_causal_lm, response_logprobs
from rlhf_ray.workers.objectives import PolicyObjective
from tests.workers.test_learners import ppo_batch

SAMPLING = {
    "plain": {"temperature": 0.7, "top_k": 0, "top_p": 1.0},
    "filtered": {"temperature": 0.7, "top_k": 20, "top_p": 0.9},
}


def old_loss(module, mb, ppo, sampling) -> torch.Tensor:
    """The loss as computed before: the head's chunk recomputed in the backward, and no
    entropy in it (its coefficient is 0)."""
    full: list[torch.Tensor] = []
    logprobs, _ = response_logprobs(
        module,
        mb.input_ids,
        mb.attention_mask,
        mb.prompt_len,
        **sampling,
        full=full,
        recompute=True,
    )
    mask, agg = mb.response_mask, ppo.loss_agg
    loss, _ = policy_loss(logprobs, mb.old_logprobs, mb.advantages, mask, ppo.clip_eps, agg)
    return loss + ppo.kl_loss_coef * kl_loss(full[0], mb.ref_logprobs, mask, ppo.kl_in_loss, agg)


def stepped(loss_fn) -> dict[str, torch.Tensor]:
    """The weights of a fresh tiny Llama after one AdamW step on ``loss_fn(model)``."""
    spec = ModelSpec(preset="llama-tiny", hidden_size=32, num_layers=2, num_heads=4, init_seed=1)
    model = build_causal_lm(spec, build_tokenizer(TokenizerConfig()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss_fn(model).backward()
    optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", list(SAMPLING))
def test_one_step_at_entropy_coef_zero_equals_the_old_loss(kind):
    ppo = load_config(
        None,
        [
            "ppo.entropy_coef=0",
            "ppo.kl_coef=0",
            "ppo.kl_in_loss=k3",
            "ppo.loss_agg=seq_mean_token_mean",
        ],
    ).ppo
    objective = PolicyObjective(ppo, SAMPLING[kind])
    mb = ppo_batch(256)
    stats: dict[str, torch.Tensor] = {}

    def new(model):
        loss, parts = objective.loss(model, mb)
        stats.update(parts)
        return loss

    after, before = stepped(new), stepped(lambda m: old_loss(m, mb, ppo, SAMPLING[kind]))
    assert after.keys() == before.keys()
    untouched = stepped(lambda m: torch.zeros((), requires_grad=True))  # no gradient, no step
    assert any(not torch.equal(after[k], untouched[k]) for k in after)  # the step moved weights
    for key in after:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=1e-6)
    # the logged entropy is the one the differentiable path computes
    spec = ModelSpec(preset="llama-tiny", hidden_size=32, num_layers=2, num_heads=4, init_seed=1)
    model = build_causal_lm(spec, build_tokenizer(TokenizerConfig()))
    _, entropy = response_logprobs(
        model, mb.input_ids, mb.attention_mask, mb.prompt_len, **SAMPLING[kind], with_entropy=True
    )
    assert entropy is not None
    expected = masked_mean(entropy.detach(), mb.response_mask)
    torch.testing.assert_close(stats["entropy"], expected, rtol=0, atol=1e-6)
