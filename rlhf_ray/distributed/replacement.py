"""Where a replacement actor goes, and how often it may be tried.

A node that is dying is often still "alive" to Ray for some seconds (until it misses enough
health checks): an actor placed there dies before it is ready ("The actor never ran - it was
cancelled before it started running"). So a replacement is placed away from the nodes that
just lost an actor of the run and from nodes that do not answer a heartbeat now (a zero-CPU
task pinned to the node, ``heartbeat_s``), with ``NodeAffinitySchedulingStrategy(soft=True)``
on a healthy node that has every resource the actor needs free (CPUs, GPUs, custom ones), or
where Ray chooses if no node has; a replacement that dies before it is ready, or that cannot be
placed within ``cluster.actor_start_timeout_s`` (its node is then avoided too), is itself
replaced, at most ``MAX_TRIES`` times in a row. A restarted learner group's placement group is
steered the same way, by a bundle label selector on the node id (``avoid_selector``); if it
cannot be placed off those nodes within ``PLACE_OFF_SUSPECTS_S`` it is placed anywhere.
``NodeHealth.replacements`` counts every replacement (``recovery/replacements`` in
``metrics.jsonl``), those Ray makes itself of a scorer started with ``max_restarts`` included.
"""

from __future__ import annotations

import time
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

MAX_TRIES = 4  # replacements of one lost actor that may die before they are ready
SUSPECT_S = 120.0  # how long a node that lost an actor is avoided
PLACE_OFF_SUSPECTS_S = 30.0  # how long a learner group waits for a place off suspect nodes
NODE_ID_LABEL = "ray.io/node-id"  # every Ray node carries its id as this label


@ray.remote(num_cpus=0, max_retries=0)
def _heartbeat() -> bool:
    return True


def _actor_entry(handle: Any) -> dict[str, Any]:
    """The actor's entry in Ray's GCS actor table (which also knows dead actors); empty if it
    cannot be read: the table is best effort, and each reader below falls back."""
    from ray._private import state

    try:
        return state.actors(actor_id=handle._actor_id.hex()) or {}
    except Exception:  # placement then falls back to Ray's choice
        return {}


def actor_node(handle: Any) -> str | None:
    """The id of the node an actor runs (or ran) on; None if unknown."""
    return (_actor_entry(handle).get("Address") or {}).get("NodeID") or None


def actor_state(handle: Any) -> str | None:
    """The actor's state (``ALIVE``, ``RESTARTING``, ``DEAD`` ...); None if unknown."""
    return _actor_entry(handle).get("State")


def actor_restarts(handle: Any) -> int:
    """How many times Ray has restarted the actor itself (``max_restarts``); 0 if unknown."""
    return int(_actor_entry(handle).get("NumRestarts") or 0)


def avoid_selector(nodes: list[str]) -> dict[str, str]:
    """A label selector matching every node but ``nodes`` (for a placement group's bundles)."""
    return {NODE_ID_LABEL: f"!in({','.join(sorted(nodes))})"}


def _answers(node_id: str, timeout_s: float) -> bool:
    strategy = NodeAffinitySchedulingStrategy(node_id, soft=False)
    ref = _heartbeat.options(scheduling_strategy=strategy).remote()
    try:
        return bool(ray.get(ref, timeout=timeout_s))
    except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
        ray.cancel(ref, force=True)
        return False


def unplaced(health: NodeHealth, strategy: Any) -> str:
    """The cause logged for a replacement sent by ``strategy`` that could not be placed in
    time; its node is avoided from then on, so the next try goes elsewhere."""
    node = health.unplaceable(strategy)
    where = f"on node {node}" if node else "anywhere"
    return f"had its replacement not placed {where} within cluster.actor_start_timeout_s"


class NodeHealth:
    """The run's view of which nodes new actors should avoid; counts the replacements."""

    def __init__(self, heartbeat_s: float = 3.0):
        self.heartbeat_s = heartbeat_s
        self._suspect: dict[str, float] = {}  # node id -> when it last lost an actor
        self.replacements = 0

    def lost(self, handle: Any) -> str | None:
        """Note that ``handle`` was lost: its node is avoided for a while. Returns the node."""
        node = actor_node(handle)
        if node is not None:
            self._suspect[node] = time.monotonic()
        return node

    def suspect(self, node_id: str) -> bool:
        when = self._suspect.get(node_id)
        return when is not None and time.monotonic() - when < SUSPECT_S

    def healthy_node(self, needs: dict[str, float]) -> str | None:
        """A live node with every resource of ``needs`` (``{"CPU": 1, "GPU": 0.5, ...}``) free
        that lost no actor lately and answers a heartbeat; most free CPUs first. None: no such
        node (Ray then places the actor itself)."""
        from ray._private import state

        free = state.available_resources_per_node()
        alive = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
        ranked = sorted(alive, key=lambda n: -free.get(n, {}).get("CPU", 0.0))
        for node in ranked:
            have = free.get(node, {})
            short = any(have.get(k, 0.0) + 1e-9 < v for k, v in needs.items() if v > 0)
            if short or self.suspect(node):
                continue
            if _answers(node, self.heartbeat_s):
                return node
            self._suspect[node] = time.monotonic()  # missed its heartbeat
        return None

    def lost_dead(self, handles: list[Any]) -> list[str]:
        """Note the nodes of those ``handles`` that Ray's actor table no longer shows alive
        (a learner group's dead ranks); returns them."""
        return sorted({n for h in handles if actor_state(h) != "ALIVE" and (n := self.lost(h))})

    def avoid(self) -> list[str]:
        """The live nodes new actors should stay off: those that lost an actor lately and
        those that miss a heartbeat now. Empty when no other live node is left (avoiding
        every node would only delay the placement)."""
        alive = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
        for node in alive:
            if not self.suspect(node) and not _answers(node, self.heartbeat_s):
                self._suspect[node] = time.monotonic()  # missed its heartbeat
        avoid = [n for n in alive if self.suspect(n)]
        return avoid if len(avoid) < len(alive) else []

    def strategy(self, needs: dict[str, float]) -> Any:
        """Where a replacement needing ``needs`` goes: soft affinity to a healthy node with
        them free (None: Ray's default, anywhere)."""
        node = self.healthy_node(needs)
        return None if node is None else NodeAffinitySchedulingStrategy(node, soft=True)

    def unplaceable(self, strategy: Any) -> str | None:
        """A replacement sent by ``strategy`` could not be placed in time: its node (if it
        named one) is avoided for a while, so the next try goes elsewhere. Returns the node."""
        node = getattr(strategy, "node_id", None)
        if node is not None:
            self._suspect[node] = time.monotonic()
        return node

    def record(self, what: str, cause: str, detail: str = "") -> None:
        """Count one replacement and name it in the log with its cause: ``what`` and ``cause``
        read as one sentence ("rollout worker 1" "died while generating")."""
        self.replacements += 1
        extra = f" ({detail})" if detail else ""
        print(
            f"[rlhf_ray] {what} {cause}{extra}; replacing it [replacement {self.replacements}]",
            flush=True,
        )
