"""A non-finite loss skips its update on every rank and is counted; too many in a row stop the
run with a clear error."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.config.ppo import load_config
from rlhf_ray.types import PPOBatch
from rlhf_ray.workers.learners import NonFiniteLossError, PolicyLearner
from tests.workers.test_learners import join_world_of_one

OVERRIDES = ["policy.engine=torch", "policy.num_ranks=1", "ppo.epochs=1",
             "rollout.batch_size=4", "ppo.minibatch_size=2", "policy.optim.lr=0.1"]  # fmt: skip
CFG = load_config(None, OVERRIDES)


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


def _accumulating(*engine: str) -> tuple[PolicyLearner, list[bool]]:
    """A learner whose steps accumulate 2 micro-batches of 1 row; ``backwards`` records, per
    backward, whether its loss was finite."""
    cfg = load_config(None, [*OVERRIDES, "ppo.micro_batch_size=1", *engine])
    learner = PolicyLearner(cfg.policy, cfg.ppo, cfg.tokenizer, 1.0)
    if engine:
        join_world_of_one(learner)
    learner.setup()
    assert learner.accumulation == 2
    engine, backwards = learner.engine, []
    assert engine is not None
    original = engine.backward

    def backward(loss: torch.Tensor) -> None:
        backwards.append(bool(torch.isfinite(loss).all()))
        original(loss)

    engine.backward = backward  # type: ignore[method-assign]
    return learner, backwards


@pytest.mark.parametrize(
    ("bad", "engine"),
    [
        ("first", ()),
        ("last", ()),
        ("last", ("policy.engine=deepspeed", "policy.zero_stage=1")),
        ("first", ("policy.engine=deepspeed", "policy.zero_stage=3")),
    ],
)
def test_a_non_finite_micro_batch_skips_its_whole_accumulated_step(bad, engine):
    """Either micro-batch of a 2-micro-batch step non-finite: every micro-batch still runs its
    backward (ZeRO reduces at the boundary's), no update is applied, and each step is counted
    as skipped once."""
    learner, backwards = _accumulating(*engine)
    before = _params(learner)
    gen = torch.Generator().manual_seed(0)  # the learner's round-0 shuffle (train.seed 0)
    perm = torch.randperm(4, generator=gen)
    # the row of each minibatch that its first (or last) micro-batch trains on
    rows = [int(perm[0]), int(perm[2])] if bad == "first" else [int(perm[1]), int(perm[3])]
    stats = learner.train(_batch(nan_rows=rows), round_index=0)
    assert stats["policy_skipped_steps"] == 2
    assert len(backwards) == 4  # 2 steps x 2 micro-batches, none left out
    assert all(torch.equal(before[k], v) for k, v in _params(learner).items())

    stats = learner.train(_batch(nan_rows=[]), round_index=1)
    assert stats["policy_skipped_steps"] == 0 and learner.bad_in_row == 0
    assert any(not torch.equal(before[k], v) for k, v in _params(learner).items())
