"""KL early stopping on 2 ZeRO-2 policy ranks (Ray actors, gloo): both ranks stop at the same
minibatch (the KL is averaged over ranks by one all-reduce before the decision), and the ranks'
weights stay identical after it."""

from __future__ import annotations

import pytest
import ray
import torch

from rlhf_ray.config.ppo import load_config
from rlhf_ray.data.tokenization import build_tokenizer
from rlhf_ray.distributed.learner_group import LearnerGroup
from rlhf_ray.models import build_causal_lm, response_logprobs
from rlhf_ray.types import PPOBatch
from rlhf_ray.workers.learners import PolicyLearner

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROWS, PROMPT, RESPONSE = 8, 4, 6


def own_batch(cfg) -> PPOBatch:
    """Old log-probs of the preset's own (seeded) weights: the first minibatch's KL is 0."""
    model = build_causal_lm(cfg.policy.model, build_tokenizer(cfg.tokenizer))
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, model.config.vocab_size, (ROWS, PROMPT + RESPONSE), generator=g)
    attention = torch.ones_like(ids)
    with torch.no_grad():
        old, _ = response_logprobs(model, ids, attention, PROMPT, 1.0)
    return PPOBatch(
        input_ids=ids,
        attention_mask=attention,
        response_mask=torch.ones(ROWS, RESPONSE, dtype=torch.long),
        old_logprobs=old,
        old_values=torch.zeros(ROWS, RESPONSE),
        advantages=torch.randn(ROWS, RESPONSE, generator=g),
        returns=torch.zeros(ROWS, RESPONSE),
        ref_logprobs=old.clone(),
        prompt_len=PROMPT,
    )


def test_two_zero2_ranks_stop_at_the_same_minibatch(ray_cluster):
    cfg = load_config(
        None,
        [f"rollout.batch_size={ROWS}", "ppo.minibatch_size=4", "ppo.epochs=4",
         "ppo.micro_batch_size=1", "policy.num_ranks=2", "policy.engine=deepspeed",
         "policy.zero_stage=2", "policy.optim.lr=0.01", "ppo.target_kl=1e-4"],
    )  # fmt: skip
    group = LearnerGroup(
        "policy",
        PolicyLearner,
        cfg.policy,
        120,
        120,
        policy_cfg=cfg.policy,
        ppo_cfg=cfg.ppo,
        tokenizer_cfg=cfg.tokenizer,
        temperature=1.0,
    )
    try:
        ray.get(group.start())
        ranks = ray.get(group.call("train", own_batch(cfg), 0))
        weights = ray.get(group.call("full_weights"))  # rank 0's; the others None
        probes = ray.get(group.call("probe_logprobs"))
    finally:
        group.kill()
    first, second = ranks
    assert first["early_stopped"] == second["early_stopped"] == 1.0
    for key in ("early_stop_epoch", "early_stop_minibatch", "early_stop_kl"):
        assert first[key] == second[key], key
    assert first["early_stop_kl"] > 1e-4
    stopped_at = first["early_stop_epoch"] * 2 + first["early_stop_minibatch"]
    assert 1 <= stopped_at < 7  # after the first minibatch (KL 0), before the last of 8
    assert weights[0] is not None and weights[1] is None
    assert torch.equal(probes[0], probes[1])  # the ranks' weights agree after the stop
