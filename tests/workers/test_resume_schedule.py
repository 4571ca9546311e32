"""A resumed run's LR schedule spans the resumed run's optimizer steps, not the saved run's:
more PPO rounds or more stage epochs continue the decay instead of running at its end."""

from __future__ import annotations

import pytest

from rlhf_ray.config.ppo import load_config
from rlhf_ray.workers.learners import PolicyLearner
from tests.workers.test_learners import join_world_of_one
from tests.workers.test_nonfinite import _batch
from tests.workers.test_stage_learners import stage_learner

LINEAR = ["policy.optim.lr=0.1", "policy.optim.lr_schedule=linear", "policy.optim.min_lr_ratio=0"]


def _policy(total_steps: int, *engine: str) -> PolicyLearner:
    cfg = load_config(
        None,
        ["policy.engine=torch", "policy.num_ranks=1", "ppo.epochs=1", "rollout.batch_size=4",
         "ppo.minibatch_size=2", *LINEAR, *engine],
    )  # fmt: skip
    learner = PolicyLearner(cfg.policy, cfg.ppo, cfg.tokenizer, 1.0, total_steps=total_steps)
    if engine:
        join_world_of_one(learner)
    learner.setup()
    return learner


@pytest.mark.parametrize(
    "engine", [(), ("policy.engine=deepspeed", "policy.zero_stage=2")], ids=["torch", "zero2"]
)
def test_more_rounds_on_resume_stretch_the_lr_schedule(tmp_path, engine):
    saved = _policy(3, *engine)  # a run of 3 optimizer steps
    saved.train(_batch(nan_rows=[]), round_index=0)  # 2 steps: linear lr 0.1 -> 0.05 -> 0.0
    assert saved.engine.lr() == pytest.approx(0.0)  # type: ignore[union-attr]
    saved.save_state(str(tmp_path / "state"))

    resumed = _policy(5, *engine)  # resumed with more rounds: 5 steps in all
    resumed.load_state(str(tmp_path / "state"))
    # step 2 of 5, linear from step 0 to step 4: 0.1 * (1 - 2/4)
    assert resumed.engine.lr() == pytest.approx(0.05)  # type: ignore[union-attr]


def test_more_epochs_on_resume_stretch_a_stages_lr_schedule(tmp_path):
    schedule = ("optim.lr=0.1", "optim.lr_schedule=linear", "optim.min_lr_ratio=0")
    saved = stage_learner("sft", *schedule, "train.epochs=2", "train.batch_size=4")  # 4 steps
    for epoch, step in [(0, 0), (0, 1)]:
        saved.train_step(epoch, step)
    assert saved.engine.lr() == pytest.approx(0.1 * (1 - 2 / 3))
    saved.save_state(str(tmp_path / "state"))

    resumed = stage_learner("sft", *schedule, "train.epochs=3", "train.batch_size=4")  # 6 steps
    resumed.load_state(str(tmp_path / "state"))
    assert resumed.engine.lr() == pytest.approx(0.1 * (1 - 2 / 5))
