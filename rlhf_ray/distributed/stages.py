"""RayStage: a stage's learner group as named Ray actors, satisfying ``workers.StageWorkers``.

The group is the PPO runtime's ``LearnerGroup`` (one placement group, DeepSpeed ranks joined by
torch.distributed: gloo on CPU, NCCL on GPUs) with the stage learner class; actors are named
``{role}-{rank}`` (``sft-0``, ``rm-0`` ...) in the run's namespace. Each call is submitted to
every rank, then waited on once. A lost rank restarts the group off the nodes of its dead ranks
(``distributed/replacement.py``), at most ``MAX_TRIES`` times in a row if the restarted ranks
die before they are ready; each train step's row carries the counts
(``train/learner_restarts``, ``train/replacements``).
"""

from __future__ import annotations

from pathlib import Path

import ray
import torch

from rlhf_ray.config.ppo import ClusterConfig
from rlhf_ray.distributed.actors import dead_peer, get_all, wait_ready
from rlhf_ray.distributed.learner_group import LearnerGroup
from rlhf_ray.distributed.replacement import MAX_TRIES, NodeHealth
from rlhf_ray.errors import UserError
from rlhf_ray.types import Rows
from rlhf_ray.workers.interface import LearnerLostError, mean_stats
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
        self.role, self.cluster, self.dist_timeout_s = role, cluster, dist_timeout_s
        self.restarts = 0
        self.health = NodeHealth()  # where a restarted group goes; counts the replacements
        self._data: tuple = ()  # the object refs of the loaded data (a restart loads them again)
        self._start()

    def _start(self, avoid: list[str] | None = None) -> None:
        role, timeout = self.role, self.cluster.actor_start_timeout_s
        self.group = LearnerGroup(
            role.name,
            role.cls,
            role.role_cfg,
            timeout,
            self.dist_timeout_s,
            avoid=avoid,
            learner_cfg=role.role_cfg,
            **role.kwargs,
        )
        try:
            wait_ready(self.group.handles, timeout)
            counts = self._all("setup", self.group.start())
        except BaseException:
            self.health.lost_dead(self.group.actors)  # before the kill: it kills them all
            self.group.kill()  # leave nothing pending or half-started behind
            raise
        held = ", ".join(f"rank {r}: {loc:,}/{tot:,}" for r, (loc, tot) in enumerate(counts))
        print(f"[rlhf_ray] {role.name} parameters held per rank ({held})", flush=True)

    def _all(self, phase: str, refs: list) -> list:
        """Every rank's answer; a lost rank raises ``LearnerLostError`` naming the group."""
        try:
            return get_all(refs, self.group.names, phase)
        except ray.exceptions.RayActorError as exc:
            names = ", ".join(self.group.names)
            raise LearnerLostError(f"a learner of {names} died during {phase}") from exc
        except ray.exceptions.RayTaskError as exc:  # a rank's peers may fail before it reads dead
            dead = dead_peer(refs, self.group.names)
            if dead is None:
                raise
            raise LearnerLostError(f"learner {dead} died during {phase}") from exc

    def restart(self) -> None:
        """Kill the group and start it again with the data it had (the caller restores a
        checkpoint): ``stages/checkpoint.py``'s recovery."""
        self.restarts += 1
        name = self.role.name
        print(f"[rlhf_ray] restarting the {name} learner group ({self.restarts})", flush=True)
        dead = self.health.lost_dead(self.group.actors)
        cause = f"lost a rank (node {', '.join(dead) or 'unknown'})"
        for _ in range(MAX_TRIES):  # a group placed on a dying node is itself replaced
            self.health.record(f"the {name} learner group", cause)
            self.group.kill()
            try:
                self._start(self.health.avoid())
                if self._data:
                    self._all("load_data", self.group.call("load_data", *self._data))
                return
            except (ray.exceptions.RayActorError, LearnerLostError) as exc:
                cause = f"had a restarted rank die before it was ready ({type(exc).__name__})"
        raise LearnerLostError(f"the {name} learner group died {MAX_TRIES} times while starting")

    def load_data(self, train: Rows, eval_set: Rows | None) -> None:
        self._data = (ray.put(train), ray.put(eval_set))
        self._all("load_data", self.group.call("load_data", *self._data))

    def train_step(self, epoch: int, step: int) -> dict[str, float]:
        stats = mean_stats(self._all("train_step", self.group.call("train_step", epoch, step)))
        counts = {"learner_restarts": self.restarts, "replacements": self.health.replacements}
        return stats | {k: float(v) for k, v in counts.items()}

    def evaluate(self, split: str) -> dict[str, float]:
        return self._all("evaluate", self.group.call("evaluate", split))[0]

    def scores(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self._all("scores", self.group.call("scores", split))[0]

    def save(self, directory: Path) -> None:
        self._all("save", self.group.call("save", str(directory)))

    def save_state(self, directory: Path) -> None:
        self._all("save_state", self.group.call("save_state", str(directory)))

    def load_state(self, directory: Path) -> None:
        self._all("load_state", self.group.call("load_state", str(directory)))

    def close(self) -> None:
        self.group.kill()
