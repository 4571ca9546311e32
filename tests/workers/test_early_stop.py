"""KL early stopping (``ppo.target_kl``) on one in-process rank: the update stops at the first
minibatch whose approximate KL passes the target, with micro-batches too; null changes nothing.
The two-rank ZeRO-2 case is tests/distributed/test_early_stop_ranks.py."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.config.ppo import load_config
from rlhf_ray.models.weights import state_dict_to_numpy
from rlhf_ray.types import PPOBatch
from rlhf_ray.workers.learners import PolicyLearner

ROWS, PROMPT, RESPONSE = 8, 4, 6
SHAPE = [f"rollout.batch_size={ROWS}", "ppo.minibatch_size=2", "ppo.epochs=3",
         "policy.num_ranks=1", "policy.engine=torch", "policy.optim.lr=0.01"]  # fmt: skip


def own_batch(learner: PolicyLearner) -> PPOBatch:
    """A batch whose old log-probs are the learner's own: the first minibatch's KL is 0, and it
    grows with every step (lr 0.01)."""
    g = torch.Generator().manual_seed(5)
    vocab = learner.module.config.vocab_size
    ids = torch.randint(3, vocab, (ROWS, PROMPT + RESPONSE), generator=g)
    attention = torch.ones(ROWS, PROMPT + RESPONSE, dtype=torch.long)
    from rlhf_ray.models import response_logprobs

    with torch.no_grad():
        old, _ = response_logprobs(learner.module, ids, attention, PROMPT, 1.0)
    mask = torch.ones(ROWS, RESPONSE, dtype=torch.long)
    return PPOBatch(
        input_ids=ids,
        attention_mask=attention,
        response_mask=mask,
        old_logprobs=old,
        old_values=torch.zeros(ROWS, RESPONSE),
        advantages=torch.randn(ROWS, RESPONSE, generator=g),
        returns=torch.zeros(ROWS, RESPONSE),
        ref_logprobs=old.clone(),
        prompt_len=PROMPT,
    )


def trained(*overrides: str) -> tuple[dict[str, float], dict]:
    cfg = load_config(None, [*SHAPE, *overrides])
    learner = PolicyLearner(cfg.policy, cfg.ppo, cfg.tokenizer, 1.0)
    learner.setup()
    stats = learner.train(own_batch(learner), 0)
    return stats, state_dict_to_numpy(learner.engine.full_state_dict())


def max_diff(a: dict, b: dict) -> float:
    return max(float(abs(a[k][0].astype("float64") - b[k][0]).max()) for k in a)


@pytest.mark.parametrize("micro", [[], ["ppo.micro_batch_size=1"]])
def test_the_update_stops_at_the_first_minibatch_past_the_target(micro):
    full, full_weights = trained(*micro, "ppo.target_kl=1e9")  # never passes: all 12 steps
    assert full["early_stopped"] == 0.0 and full["early_stop_minibatch"] == -1.0
    stats, weights = trained(*micro, "ppo.target_kl=1e-4")
    assert stats["early_stopped"] == 1.0
    assert stats["early_stop_kl"] > 1e-4
    # the first minibatch's KL is 0 (old log-probs are the model's own), so it stops later on
    stopped_at = stats["early_stop_epoch"] * 4 + stats["early_stop_minibatch"]
    assert 1 <= stopped_at < 11
    assert max_diff(weights, full_weights) > 0  # fewer steps: other weights


def test_null_target_kl_is_the_update_without_early_stopping():
    """target_kl null: no early-stop stats, and the weights of a target that is never passed
    (every step taken) to the last bit."""
    plain, plain_weights = trained()
    assert not any(k.startswith("early_stop") for k in plain)
    _, never_weights = trained("ppo.target_kl=1e9")
    assert max_diff(plain_weights, never_weights) == 0.0
