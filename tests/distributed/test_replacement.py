"""Where a replacement goes (``distributed/replacement.py``), without a cluster: the cluster's
view is faked."""

from __future__ import annotations

import pytest
from ray._private import state

from rlhf_ray.distributed import replacement
from rlhf_ray.distributed.replacement import NodeHealth

NODES = [{"NodeID": "head", "Alive": True}, {"NodeID": "second", "Alive": True},
         {"NodeID": "gone", "Alive": False}]  # fmt: skip


@pytest.fixture
def cluster(monkeypatch):
    free = {"head": {"CPU": 1.0}, "second": {"CPU": 2.0}, "gone": {"CPU": 4.0}}
    silent: set[str] = set()
    monkeypatch.setattr(replacement.ray, "nodes", lambda: NODES)
    monkeypatch.setattr(state, "available_resources_per_node", lambda: free)
    monkeypatch.setattr(replacement, "_answers", lambda node, timeout: node not in silent)
    monkeypatch.setattr(replacement, "actor_node", lambda handle: handle)
    return free, silent


def test_a_replacement_avoids_nodes_that_lost_actors_or_miss_their_heartbeat(cluster, capsys):
    free, silent = cluster
    health = NodeHealth()
    assert health.healthy_node(1.0) == "second"  # live, most CPUs free
    assert health.lost("second") == "second"  # a rollout worker there was lost
    assert health.healthy_node(1.0) == "head"
    assert health.healthy_node(2.0) is None  # head has 1 CPU free: Ray places it itself
    silent.add("head")  # the head does not answer its heartbeat now
    assert health.healthy_node(1.0) is None and health.suspect("head")
    health.record("rollout worker 1", "died while generating (node second)")
    health.record("rollout worker 1", "had its replacement die before it was ready")
    assert health.replacements == 2
    out = capsys.readouterr().out
    assert "rollout worker 1 died while generating (node second); replacing it" in out
    assert "[replacement 2]" in out


def test_a_node_is_suspect_only_for_a_while(cluster, monkeypatch):
    health = NodeHealth()
    health.lost("second")
    assert health.suspect("second") and not health.suspect("head")
    now = replacement.time.monotonic()
    monkeypatch.setattr(replacement.time, "monotonic", lambda: now + replacement.SUSPECT_S + 1)
    assert not health.suspect("second")
    assert health.healthy_node(1.0) == "second"  # chosen again


def test_a_replacement_that_dies_before_it_is_ready_is_replaced_in_turn(monkeypatch, capsys):
    import ray

    from rlhf_ray.config import load_config
    from rlhf_ray.distributed import rollout_pool

    pool = rollout_pool.RolloutPool(load_config(None, ["rollout.num_workers=3"]))
    pool.workers = ["w0", "w1", "w2"]
    monkeypatch.setattr(rollout_pool, "kill_actors", lambda handles: None)
    monkeypatch.setattr(replacement, "actor_node", lambda handle: "second")
    monkeypatch.setattr(NodeHealth, "strategy", lambda self, cpus: None)
    deaths = iter([True, True, False])  # two replacements die on the dying node, then one lives

    def grow(n, strategy=None):
        if next(deaths):
            raise ray.exceptions.ActorDiedError()
        pool.workers.append("new")

    monkeypatch.setattr(pool, "grow", grow)
    pool._replace(1, "died while loading weights")
    assert pool.workers == ["w0", "new", "w2"]  # in the lost one's place
    assert pool.restarts == 3 and pool.health.replacements == 3
    out = capsys.readouterr().out
    assert "rollout worker 1 died while loading weights (node second); replacing it" in out
    assert out.count("had its replacement die before it was ready (ActorDiedError)") == 2

    deaths = iter([True] * replacement.MAX_TRIES)
    with pytest.raises(RuntimeError, match="replacements in a row died before they were ready"):
        pool._replace(0, "died while generating")
