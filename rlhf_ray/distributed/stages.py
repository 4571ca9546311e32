"""RayStage: a stage's learner group as named Ray actors, satisfying ``workers.StageWorkers``.

The group is the PPO runtime's ``LearnerGroup`` (one placement group, DeepSpeed ranks joined by
torch.distributed: gloo on CPU, NCCL on GPUs) with the stage learner class; actors are named
``{role}-{rank}`` (``sft-0``, ``rm-0`` ...) in the run's namespace. Each call is submitted to
every rank, then waited on once.
"""

from __future__ import annotations

from pathlib import Path

import ray
import torch

from rlhf_ray.config import ClusterConfig
from rlhf_ray.distributed.runtime import LearnerGroup, get_all, wait_ready
from rlhf_ray.errors import UserError
from rlhf_ray.types import Rows
from rlhf_ray.workers.interface import mean_stats
from rlhf_ray.workers.stage_learners import StageRole


def _check_name_free(name: str) -> None:
    try:
        ray.get_actor(name)
    except ValueError:
        return
    namespace = ray.get_runtime_context().namespace
    raise UserError(
        f"another run's actor {name!r} is alive in Ray namespace {namespace!r} of this "
        "cluster: wait for that run to end, or give this one its own cluster.namespace"
    )


class RayStage:
    """The stage's learner ranks as Ray actors; the stage driver's ``StageWorkers``."""

    def __init__(self, role: StageRole, cluster: ClusterConfig, dist_timeout_s: int):
        _check_name_free(f"{role.name}-0")
        timeout = cluster.actor_start_timeout_s
        self.group = LearnerGroup(role.name, role.cls, role.role_cfg, timeout, dist_timeout_s,
                                  learner_cfg=role.role_cfg, **role.kwargs)  # fmt: skip
        try:
            wait_ready(self.group.handles, timeout)
            counts = get_all(self.group.start())
        except BaseException:
            self.group.kill()  # leave nothing pending or half-started behind
            raise
        held = ", ".join(f"rank {r}: {loc:,}/{tot:,}" for r, (loc, tot) in enumerate(counts))
        print(f"[rlhf_ray] {role.name} parameters held per rank ({held})", flush=True)

    def load_data(self, train: Rows, eval_set: Rows | None) -> None:
        get_all(self.group.call("load_data", ray.put(train), ray.put(eval_set)))

    def train_step(self, epoch: int, step: int) -> dict[str, float]:
        return mean_stats(get_all(self.group.call("train_step", epoch, step)))

    def evaluate(self, split: str) -> dict[str, float]:
        return get_all(self.group.call("evaluate", split))[0]

    def scores(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        return get_all(self.group.call("scores", split))[0]

    def save(self, directory: Path) -> None:
        get_all(self.group.call("save", str(directory)))

    def close(self) -> None:
        self.group.kill()
