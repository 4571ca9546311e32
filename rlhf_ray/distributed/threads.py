"""Torch threads per phase on CPU nodes (``cluster.phase_threads``).

Ray starts each actor with as many threads as its CPU share (``actors.py``): actors that work
at the same time must not oversubscribe the cores (2 actors x 2 threads on 2 cores ran about
5x slower than 2 x 1). But the driver runs one phase at a time: during the update only the
learners work, during generation only the rollout workers, and the CPUs the rest of the run
holds on that node sit idle. So before each phase, the CPUs that the run's CPU-only actors hold
on a node are divided among those of them that work in the phase there, in proportion to their
shares, rounded down (never below one thread). The sum of a node's threads then never passes
what the run holds there (other tenants' CPUs stay theirs), and a phase whose actors fill the
node (two rollout workers of 1 CPU on 2 cores) runs as before. GPU actors keep their share:
their work is on the device. The sync counts the policy ranks and the rollout workers: they
copy buckets at the same time (torch's copies are threaded too).

Measured on 2 cores (SmolLM2-135M, ``jobs/arithmetic_cpu.yaml``, README "Speed"): the update
and generation run on two threads instead of one; the score phase, where the policy and the
reference work at the same time, keeps one each.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import ray

from rlhf_ray.config.ppo import Config
from rlhf_ray.distributed.actors import share_threads
from rlhf_ray.distributed.plan import resource_plan
from rlhf_ray.distributed.replacement import actor_node


def phase_threads(working: dict[str, tuple[str, float]], held: dict[str, float]) -> dict[str, int]:
    """Threads for each actor working in a phase. ``working``: actor -> (its node, its CPU
    share); ``held``: node -> the CPUs the run's CPU actors hold there. Each node's CPUs are
    split in proportion to the shares of the actors working there, rounded down, at least 1."""
    busy: dict[str, float] = defaultdict(float)
    for node, cpus in working.values():
        busy[node] += cpus
    return {
        actor: max(1, int(held[node] * cpus / busy[node] + 1e-9))
        for actor, (node, cpus) in working.items()
    }


class PhaseThreadPlanner:
    """Resizes the torch thread pools of the actors of the phase about to run.

    ``actors(role)`` gives the live handles of a role of ``plan.resource_plan`` now
    (``policy``, ``value``, ``reference``, ``reward``, ``rollout``), so a replaced or added
    actor is counted from its first phase. An actor's node is read once (Ray's actor table);
    one whose node is unknown keeps its share. A resize is one short call, sent only when an
    actor's threads change, and not waited on: an actor runs one caller's calls in the order
    they were sent, so the phase's call runs after it. Its answer is collected later (an error
    left unfetched would be printed as unhandled); a dead actor is the phase's to handle, as
    before."""

    def __init__(self, cfg: Config, actors: Callable[[str], list[Any]]):
        self.enabled = cfg.cluster.phase_threads
        self.actors = actors
        # role -> CPUs per actor, for the roles that run on CPUs only (the plan's own figures)
        self.share = {r.role: r.cpus for r in resource_plan(cfg) if not r.gpus and r.cpus > 0}
        self.nodes: dict[str, str | None] = {}  # actor id -> node id
        self.threads: dict[str, int] = {}  # actor id -> threads it runs with now
        self.pending: list[Any] = []  # resizes whose answers are not collected yet

    def before(self, *roles: str) -> None:
        """Give the actors of ``roles`` (the phase's) their threads for it."""
        if not self.enabled:
            return
        self.collect()
        placed = self._placed()
        held: dict[str, float] = defaultdict(float)
        for node, cpus, _, _ in placed.values():
            held[node] += cpus
        working = {k: (node, cpus) for k, (node, cpus, _, role) in placed.items() if role in roles}
        for key, n in phase_threads(working, held).items():
            _, cpus, handle, _ = placed[key]
            if self.threads.get(key, share_threads(cpus)) != n:
                self.pending.append(handle.set_threads.remote(n))
                self.threads[key] = n

    def _placed(self) -> dict[str, tuple[str, float, Any, str]]:
        """Actor id -> (node, CPU share, handle, role) of the run's CPU actors whose node is
        known."""
        out = {}
        for role, cpus in self.share.items():
            for handle in self.actors(role):
                key = handle._actor_id.hex()
                if key not in self.nodes:
                    self.nodes[key] = actor_node(handle)
                if self.nodes[key] is not None:
                    out[key] = (self.nodes[key], cpus, handle, role)
        return out

    def collect(self) -> None:
        """Fetch the answers of the resizes that have one (a dead actor's error included)."""
        if not self.pending:
            return
        ready, self.pending = ray.wait(self.pending, num_returns=len(self.pending), timeout=0)
        for ref in ready:
            with contextlib.suppress(ray.exceptions.RayActorError):
                ray.get(ref)
