"""Either sync transport (``sync.transport``) survives a rollout worker killed in the middle of a
weight sync: the run goes on, every round has all its samples, and the replacement's first
sync passes the sync check (it is the worker probed right after it). The collective transport
is run both ways a worker receives: from rank 0's shared slot (a worker on its host, the
default) and by broadcast (``sync.shared_memory=false``, as a worker on another host)."""

from __future__ import annotations

import pytest
import ray

from rlhf_ray.config.ppo import load_config
from rlhf_ray.distributed import RayWorkers, cluster, rollout_pool, weight_transport
from rlhf_ray.observe.metrics import read_metrics
from rlhf_ray.ppo.loop import run_ppo

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROUNDS = 4
KILL_AT = 3  # the version whose sync loses rollout-1; the probe of version 3 asks worker 3 % 2


def _kill_mid_sync(monkeypatch, transport: str, killed: list[str]) -> None:
    """Kill rollout worker 1 once version ``KILL_AT`` is on its way: object store, before the
    workers load its second bucket; collective, once every bucket's broadcast is submitted."""

    def kill(pool_workers) -> None:
        if not killed:
            killed.append("rollout-1")
            ray.kill(pool_workers[1], no_restart=True)

    if transport == "object_store":
        load = rollout_pool.RolloutPool.load_bucket

        def load_bucket(self, ref, index):
            if self._version == KILL_AT and index == 1:
                kill(self.workers)
            return load(self, ref, index)

        monkeypatch.setattr(rollout_pool.RolloutPool, "load_bucket", load_bucket)
        return
    send, get_all = weight_transport.CollectiveSender.send, weight_transport.get_all
    now: dict = {}

    def sending(self, workers, version, count):
        now.update(version=version, workers=workers)
        return send(self, workers, version, count)

    def waiting(refs, names=None, phase="", *args):
        if now.get("version") == KILL_AT and phase == "sync" and len(now["workers"]) == 2:
            kill(now["workers"])  # the broadcasts are submitted: rank 0 is sending
        return get_all(refs, names, phase, *args)

    monkeypatch.setattr(weight_transport.CollectiveSender, "send", sending)
    monkeypatch.setattr(weight_transport, "get_all", waiting)


@pytest.mark.parametrize(
    ("transport", "shared_memory"),
    [("object_store", True), ("collective", True), ("collective", False)],
    ids=["object_store", "collective", "collective-broadcast"],
)
def test_a_worker_killed_mid_sync_is_replaced_and_the_run_goes_on(
    ray_cluster, tmp_path, monkeypatch, transport, shared_memory
):
    cfg = load_config(None, ["policy.engine=torch", "policy.num_ranks=1", "value.engine=torch",
                             "rollout.batch_size=8", "ppo.minibatch_size=4",
                             "rollout.max_new_tokens=8", f"train.rounds={ROUNDS}",
                             "sync.bucket_mb=0.05", f"sync.transport={transport}",
                             f"sync.shared_memory={str(shared_memory).lower()}",
                             "train.phase_timeout_s=20", "logging.progress=false"])  # fmt: skip
    killed: list[str] = []
    _kill_mid_sync(monkeypatch, transport, killed)
    probed: dict[int, int] = {}  # version -> the worker id probed after its sync
    workers = RayWorkers(cfg)
    probe = workers.probe_sync

    def probe_sync(version):
        diff, worker_id = probe(version)
        probed[version] = worker_id
        return diff, worker_id

    workers.probe_sync = probe_sync
    try:
        run_ppo(cfg, workers, tmp_path / "run")
    finally:
        workers.close()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert killed == ["rollout-1"]
    assert [r["round"] for r in rows] == list(range(ROUNDS))
    assert [r["rollout/num_samples"] for r in rows] == [8] * ROUNDS
    assert rows[-1]["rollout/worker_restarts"] == 1
    assert [r["rollout/num_workers"] for r in rows] == [2] * ROUNDS
    assert probed[KILL_AT] == 2  # the replacement (ids are never reused) ...
    assert all(r["sync/logprob_max_abs_diff"] <= 1e-6 for r in rows)  # ... passed the check
    assert all(r["sync/bytes"] > 0 and r["sync/seconds"] > 0 for r in rows)


def test_auto_counts_machines_not_raylets(monkeypatch):
    """``sync.transport: auto`` on CPUs is collective on one machine: raylets that share it
    (a test's second node) count once, dead nodes not at all."""
    nodes = [
        {"NodeManagerAddress": "10.0.0.1", "Alive": True},
        {"NodeManagerAddress": "10.0.0.1", "Alive": True},
        {"NodeManagerAddress": "10.0.0.2", "Alive": False},
    ]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    assert cluster.cluster_hosts() == 1
    nodes[2]["Alive"] = True
    assert cluster.cluster_hosts() == 2
