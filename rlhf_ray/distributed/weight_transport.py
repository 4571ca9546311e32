"""``CollectiveSender``: the driver's side of ``sync.transport: collective``.

It forms the weight-sync group (``workers/collective.py``) of policy rank 0 and a list of
rollout workers, and streams one version's buckets over it. One group for the whole pool, not
one per worker: one broadcast call per tensor for the whole pool, which NCCL pipelines along a
ring or tree so that rank 0 sends each bucket about once, where one group per worker would
always send it N times from rank 0 (and N calls). Neither NCCL nor gloo lets a member leave or join a formed group, so the group is formed
again (a new tag on rank 0's rendezvous store) whenever its members change: a worker lost or
added, or a new rank 0 after a learner restart. Workers that join the pool between syncs
(``rlhf-ray scale``, a replacement) catch up in a group of rank 0 and themselves.

Every call of a version is submitted at once: rank 0 gathers bucket k+1 (a collective of the
learner ranks under ZeRO-3) while its broadcast of bucket k runs, and each worker receives
bucket after bucket. A member that dies or hangs makes the others' broadcasts fail within the
group's timeout (``train.phase_timeout_s``); ``send`` then names the lost workers so the pool
can retry on the survivors.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray

from rlhf_ray.distributed.actors import get_all
from rlhf_ray.distributed.learner_group import LearnerGroup, bundle_node_ip
from rlhf_ray.workers.collective import WeightSyncError


@dataclass
class Outcome:
    """How one ``send`` went: ``ok``, or the workers lost (index in the list sent to: why)."""

    ok: bool
    lost: dict[int, str] = field(default_factory=dict)


class CollectiveSender:
    """Forms the sync group and broadcasts versions over it (see the module docstring)."""

    def __init__(
        self,
        policy: Callable[[], LearnerGroup],
        bucket_mb: float,
        timeout_s: float,
        backend: str,
        shared_memory: bool = True,
    ):
        """``policy()``: the policy learner group now (a restart replaces it).
        ``shared_memory``: ``sync.shared_memory`` (workers on rank 0's host read its slot)."""
        self.policy, self.bucket_mb = policy, bucket_mb
        self.timeout_s, self.backend = timeout_s, backend
        self.shared_memory = shared_memory
        self._members: tuple[str, ...] | None = None  # actor ids of the formed group
        self._formations = 0
        self._store: tuple[str, int] | None = None  # (rank 0's actor id, port)

    def send(self, workers: list[Any], version: int, count: int) -> Outcome:
        """Broadcast ``count`` buckets of ``version`` to ``workers``, forming the group first
        if its members changed. A learner rank lost raises ``LearnerLostError``."""
        formed = self._form(workers)
        if not formed.ok:
            return formed
        group, mb = self.policy(), self.bucket_mb
        learner_refs, names, received = [], [], []
        for k in range(count):
            learner_refs += group.call("send_bucket", k, mb)
            names += group.names
            received.append([w.receive_bucket.remote(version, k, count) for w in workers])
        finished = group.actors[0].finish_send.remote()
        get_all(learner_refs, names, "sync", 2 * self.timeout_s)
        ok = True
        try:
            get_all([finished], group.names[:1], "sync", 2 * self.timeout_s)
        except WeightSyncError:
            ok = False
        lost = self._answers([received[k][i] for k in range(count)] for i in range(len(workers)))
        if lost or not ok:
            self._members = None  # formed again before the next send
        return Outcome(ok and not lost, lost)

    def _answers(self, per_worker: Any) -> dict[int, str]:
        """The workers (by index) that died or did not answer; those whose broadcast failed
        because another member did are not lost."""
        deadline = time.monotonic() + 2 * self.timeout_s
        lost: dict[int, str] = {}
        for index, refs in enumerate(per_worker):
            try:
                ray.get(refs, timeout=max(0.0, deadline - time.monotonic()))
            except ray.exceptions.RayActorError:
                lost[index] = "died during a weight broadcast"
            except ray.exceptions.GetTimeoutError:
                lost[index] = "did not receive weights within train.phase_timeout_s"
            except WeightSyncError:
                pass  # a survivor of another member's failure
        return lost

    def _form(self, workers: list[Any]) -> Outcome:
        """Form the group of rank 0 and ``workers`` unless it stands."""
        group = self.policy()
        rank0 = group.actors[0]
        members = tuple(a._actor_id.hex() for a in [rank0, *workers])
        if members == self._members:
            return Outcome(True)
        if self._store is None or self._store[0] != members[0]:
            port = get_all([rank0.sync_store.remote(self.timeout_s)], group.names[:1], "sync")[0]
            self._store = (members[0], port)
        address, port = bundle_node_ip(group.pg, 0), self._store[1]
        self._formations += 1
        tag, size = f"{self._formations}", len(workers) + 1
        args = (address, port, tag, size, self.timeout_s, self.backend)
        shm = {"shared_memory": self.shared_memory}
        joined = rank0.join_sync_group.remote(*args, **shm)
        refs = [
            w.join_sync_group.remote(address, port, tag, i + 1, *args[3:], **shm)
            for i, w in enumerate(workers)
        ]
        lost, ok = self._answers([r] for r in refs), True
        try:
            get_all([joined], group.names[:1], "sync", 2 * self.timeout_s)
        except WeightSyncError:
            ok = False
        if ok and not lost:
            self._members = members
        return Outcome(ok and not lost, lost)
