"""``LearnerGroup``: ``num_ranks`` learner actors of one role in a strictly packed placement
group, joined by torch.distributed (NCCL on GPUs, gloo on CPUs). A restarted group is steered
off the nodes it is told to avoid (``distributed/replacement.py``), placed anywhere if it
cannot be within ``PLACE_OFF_SUSPECTS_S``."""

from __future__ import annotations

from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlhf_ray.distributed.actors import (
    get_all,
    kill_actors,
    spawn_actor,
)
from rlhf_ray.distributed.replacement import PLACE_OFF_SUSPECTS_S, avoid_selector
from rlhf_ray.errors import UserError


def bundle_node_ip(pg: Any, bundle: int) -> str:
    """The address of the node that holds ``bundle`` of the placed group ``pg``."""
    node_id = ray.util.placement_group_table(pg)["bundles_to_node_id"][bundle]
    return next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id)


def _place_off(role: str, bundles: list[dict], avoid: list[str], timeout_s: float) -> Any:
    """The group's placement group on nodes other than ``avoid``, or None: nothing to avoid,
    or no place off them within ``PLACE_OFF_SUSPECTS_S`` (then it is placed anywhere)."""
    if not avoid:
        return None
    pg = placement_group(
        bundles,
        strategy="STRICT_PACK",
        name=f"rlhf_ray-{role}",
        bundle_label_selector=[avoid_selector(avoid)] * len(bundles),
    )
    wait_s = min(PLACE_OFF_SUSPECTS_S, timeout_s)
    if pg.wait(timeout_seconds=int(wait_s)):
        return pg
    remove_placement_group(pg)
    print(
        f"[rlhf_ray] the {role} learner group could not be placed off the suspect node(s) "
        f"{', '.join(avoid)} within {wait_s:g}s; placing it on any node",
        flush=True,
    )
    return None


class LearnerGroup:
    """``num_ranks`` learner actors in one placement group, joined by torch.distributed."""

    def __init__(
        self,
        role: str,
        cls: type,
        role_cfg,
        timeout_s: float,
        dist_timeout_s: int,
        resources: dict[str, float] | None = None,
        avoid: list[str] | None = None,
        **kwargs: Any,
    ):
        """``avoid``: node ids the group should stay off (a restart after a lost rank)."""
        n, cpus, gpus = role_cfg.num_ranks, role_cfg.num_cpus_per_rank, role_cfg.num_gpus_per_rank
        bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {}), **(resources or {})}
        self.pg = _place_off(role, [bundle] * n, avoid or [], timeout_s)
        if self.pg is None:
            # all ranks on one node: a soft PACK silently spans nodes and runs NCCL over TCP
            self.pg = placement_group([bundle] * n, strategy="STRICT_PACK", name=f"rlhf_ray-{role}")
        if not self.pg.wait(timeout_seconds=int(timeout_s)):
            remove_placement_group(self.pg)
            raise UserError(
                f"the {role} placement group ({n} x {bundle}) could not be placed on one node "
                f"within {timeout_s:g}s: a learner group's ranks share a node (STRICT_PACK), so "
                f"one node needs {n * cpus:g} CPUs and {n * gpus:g} GPUs free; lower "
                f"{role}.num_ranks or use larger nodes (`rlhf-ray plan` checks this)"
            )
        self.actors = [
            spawn_actor(
                cls,
                f"{role}-{rank}",
                cpus,
                gpus,
                rank=rank,
                world_size=n,
                strategy=PlacementGroupSchedulingStrategy(self.pg, rank),
                **kwargs,
            )
            for rank in range(n)
        ]
        self.handles = {f"{role}-{r}": a for r, a in enumerate(self.actors)}
        self.names = list(self.handles)
        self.role, self.cfg, self.dist_timeout_s = role, role_cfg, dist_timeout_s
        self._alive = True

    def start(self) -> list[Any]:
        """Rendezvous then build engines; returns the refs of each rank's (local, total) params."""
        join_groups([self])
        return self.call("setup")

    def call(self, method: str, *args: Any) -> list[Any]:
        return [getattr(a, method).remote(*args) for a in self.actors]

    def kill(self) -> None:
        if self._alive:
            self._alive = False
            kill_actors(self.actors)
            remove_placement_group(self.pg)


def join_groups(groups: list[LearnerGroup]) -> None:
    """Join each group's ranks by torch.distributed, all groups at once. A group's rank 0 hosts
    its rendezvous on a port it found free on its node (no extra task, so no extra worker
    process to start)."""
    ports = get_all(
        [g.actors[0].free_port.remote() for g in groups], [g.names[0] for g in groups], "rendezvous"
    )
    refs, names = [], []
    for group, port in zip(groups, ports, strict=True):
        backend = "nccl" if group.cfg.num_gpus_per_rank else "gloo"
        address = bundle_node_ip(group.pg, 0)
        refs += group.call("init_process_group", address, port, group.dist_timeout_s, backend)
        names += group.names
    get_all(refs, names, "rendezvous")
