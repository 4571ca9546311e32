"""A non-finite loss skips its update on every rank and is counted; too many in a row stop the
run with a clear error."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.config.ppo import load_config
from rlhf_ray.types import PPOBatch
from rlhf_ray.workers.learners import NonFiniteLossError, PolicyLearner

CFG = load_config(None, ["policy.engine=torch", "policy.num_ranks=1", "ppo.epochs=1",
                         "rollout.batch_size=4", "ppo.minibatch_size=2", "policy.optim.lr=0.1"])  # fmt: skip


def _learner(max_bad_steps: int = 3) -> PolicyLearner:
    learner = PolicyLearner(CFG.policy, CFG.ppo, CFG.tokenizer, 1.0, max_bad_steps=max_bad_steps)
    learner.setup()
    return learner


def _batch(nan_rows: list[int]) -> PPOBatch:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (4, 5), generator=gen)
    advantages = torch.ones(4, 2)
    advantages[nan_rows] = float("nan")
    return PPOBatch(
        input_ids=ids, attention_mask=torch.ones(4, 5, dtype=torch.long),
        response_mask=torch.ones(4, 2), old_logprobs=torch.full((4, 2), -5.0),
        old_values=torch.zeros(4, 2), advantages=advantages, returns=torch.zeros(4, 2),
        ref_logprobs=torch.full((4, 2), -5.0), prompt_len=3,
    )  # fmt: skip


def _params(learner: PolicyLearner) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in learner.module.state_dict().items()}


def test_a_nan_loss_skips_only_its_update_and_is_counted():
    learner = _learner()
    before = _params(learner)
    stats = learner.train(_batch(nan_rows=[0, 1, 2, 3]), round_index=0)  # both minibatches NaN
    assert stats["policy_skipped_steps"] == 2
    assert all(torch.equal(before[k], v) for k, v in _params(learner).items())  # nothing applied

    stats = learner.train(_batch(nan_rows=[]), round_index=1)
    assert stats["policy_skipped_steps"] == 0 and learner.bad_in_row == 0
    after = _params(learner)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], v) for k, v in after.items())  # finite ones applied


def test_too_many_bad_updates_in_a_row_stop_the_run():
    learner = _learner(max_bad_steps=3)
    learner.train(_batch(nan_rows=[0, 1, 2, 3]), round_index=0)  # 2 bad in a row
    with pytest.raises(NonFiniteLossError, match=r"3 updates in a row.*train\.max_bad_steps=3"):
        learner.train(_batch(nan_rows=[0, 1, 2, 3]), round_index=1)


def test_a_non_finite_gradient_skips_the_step():
    learner = _learner()
    engine = learner.engine
    assert engine is not None
    before = _params(learner)
    loss = sum(p.sum() for p in learner.module.parameters()) * float("inf") * 0 + 1
    loss.backward()  # NaN gradients reach the engine
    assert engine.step() is False
    assert all(torch.equal(before[k], v) for k, v in _params(learner).items())
