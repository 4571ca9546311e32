"""Each actor role's accelerator is explicit: GPU actors get DeepSpeed's CUDA accelerator, CPU
actors the CPU one and no visible GPU, whatever the starting process's environment holds (the
test suite itself runs with ``DS_ACCELERATOR=cpu`` in some processes).

No cluster: ``ray.remote`` and the placement group are replaced by recorders of the options each
actor would be started with.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from rlhf_ray.accelerator import AcceleratorError, default_device
from rlhf_ray.config.ppo import load_config
from rlhf_ray.distributed import actors, learner_group
from rlhf_ray.distributed.plan import resource_plan
from rlhf_ray.workers.learners import PolicyLearner

GPU_RUN = [
    "policy.num_gpus_per_rank=1",
    "value.num_gpus_per_rank=1",
    "reference.num_gpus=0.25",
    "reward.num_gpus=0",
    "rollout.num_gpus_per_worker=0.5",
]


class _Recorder:
    """Stands in for ``ray.remote``: notes each actor's options."""

    def __init__(self):
        self.options: list[dict[str, Any]] = []

    def __call__(self, cls: type) -> Any:
        recorder = self

        class Remote:
            def options(self, **options: Any) -> Any:
                recorder.options.append(options)
                return self

            def remote(self, *args: Any, **kwargs: Any) -> None:
                return None

        return Remote()


class _PlacementGroup:
    def __init__(self, bundles, strategy: str, name: str):
        self.bundle_specs, self.strategy = bundles, strategy

    def wait(self, timeout_seconds: int) -> bool:
        return True


@pytest.fixture
def started(monkeypatch) -> _Recorder:
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # what the starting process may hold
    recorder = _Recorder()
    monkeypatch.setattr(actors.ray, "remote", recorder)
    monkeypatch.setattr(learner_group, "placement_group", _PlacementGroup)
    return recorder


def test_each_role_gets_the_accelerator_of_its_resources(started):
    cfg = load_config(None, GPU_RUN)
    for role in resource_plan(cfg):
        started.options.clear()
        if role.group:
            learner_group.LearnerGroup(role.role, PolicyLearner, getattr(cfg, role.role), 60, 60)
        else:
            actors.spawn_actor(PolicyLearner, f"{role.role}-0", role.cpus, role.gpus)
        env = {o["runtime_env"]["env_vars"]["DS_ACCELERATOR"] for o in started.options}
        want = "cuda" if role.gpus > 0 else "cpu"
        assert env == {want}, f"{role.role} ({role.gpus:g} GPUs) got DS_ACCELERATOR {env}"
        hidden = {o["runtime_env"]["env_vars"].get("CUDA_VISIBLE_DEVICES") for o in started.options}
        assert hidden == ({None} if role.gpus > 0 else {""}), role.role


def test_learner_ranks_are_placed_on_one_node(started):
    cfg = load_config(None, GPU_RUN)
    group = learner_group.LearnerGroup("policy", PolicyLearner, cfg.policy, 60, 60)
    assert group.pg.strategy == "STRICT_PACK"


def test_device_follows_the_assignment_not_the_visible_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU node
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # an actor Ray gave no GPU
    assert default_device() == torch.device("cpu")


def test_an_assigned_gpu_that_torch_cannot_see_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    with pytest.raises(AcceleratorError, match="assigned a GPU .* torch sees none"):
        default_device()


def test_a_learner_group_that_spans_nodes_does_not_fit():
    from rlhf_ray.distributed.plan import Node, shortfalls

    cfg = load_config(None, GPU_RUN)  # 2 + 2 learner ranks of 1 GPU, 0.75 more for the rest
    two_by_two = [Node(16, 2), Node(16, 2), Node(16, 1)]
    assert shortfalls(resource_plan(cfg), two_by_two) == []
    problems = shortfalls(resource_plan(cfg), [Node(16, 1)] * 5)  # GPUs enough, nodes too small
    assert any("policy group (2 ranks" in p or "value group (2 ranks" in p for p in problems)


def test_fractional_gpus_are_placed_per_gpu_as_ray_does():
    """Ray puts a request below one GPU on ONE GPU: 3 x 0.6 GPUs do not fit 2 GPUs (1.8 of
    2.0 in total), 3 x 0.5 do (two share a GPU)."""
    from rlhf_ray.distributed.plan import Node, RolePlan, shortfalls

    def rollout(gpus: float) -> list[RolePlan]:
        return [RolePlan("rollout", 3, 1.0, gpus, False)]

    problems = shortfalls(rollout(0.6), [Node(16, 2)])
    assert problems == [
        "a rollout actor (1 CPUs, 0.6 GPUs, a fraction of ONE GPU, as Ray places it) fits on "
        "no node once the others are placed"
    ]
    assert shortfalls(rollout(0.5), [Node(16, 2)]) == []
    assert shortfalls(rollout(0.6), [Node(16, 2), Node(16, 1)]) == []  # a third GPU elsewhere
    # a group's fractional ranks pack per GPU too: 2 ranks x 0.6 need 2 GPUs of one node
    group = [RolePlan("policy", 2, 1.0, 0.6, True)]
    assert shortfalls(group, [Node(16, 2)]) == []
    assert shortfalls(group + rollout(0.5), [Node(16, 2)]) != []  # 0.4 left per GPU: no 0.5
