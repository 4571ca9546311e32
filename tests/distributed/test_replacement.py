"""Where a replacement goes (``distributed/replacement.py``), without a cluster: the cluster's
view is faked."""

from __future__ import annotations

import types

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
    assert health.healthy_node({"CPU": 1.0}) == "second"  # live, most CPUs free
    assert health.lost("second") == "second"  # a rollout worker there was lost
    assert health.healthy_node({"CPU": 1.0}) == "head"
    assert health.healthy_node({"CPU": 2.0}) is None  # head has 1 CPU free: Ray places it itself
    silent.add("head")  # the head does not answer its heartbeat now
    assert health.healthy_node({"CPU": 1.0}) is None and health.suspect("head")
    health.record("rollout worker 1", "died while generating (node second)")
    health.record("rollout worker 1", "had its replacement die before it was ready")
    assert health.replacements == 2
    out = capsys.readouterr().out
    assert "rollout worker 1 died while generating (node second); replacing it" in out
    assert "[replacement 2]" in out


def test_a_replacement_goes_where_every_resource_it_needs_is_free(cluster):
    """A GPU worker is not sent to the node with the most free CPUs but no free GPU; a custom
    resource counts the same; with no such node Ray places it (None: anywhere)."""
    free, _ = cluster
    free["head"].update(GPU=1.0, fast_disk=1.0)
    health = NodeHealth()
    assert health.healthy_node({"CPU": 1.0, "GPU": 0.0}) == "second"  # most CPUs free
    assert health.healthy_node({"CPU": 1.0, "GPU": 1.0}) == "head"  # the one with a GPU free
    assert health.healthy_node({"CPU": 1.0, "fast_disk": 1.0}) == "head"
    assert health.healthy_node({"CPU": 1.0, "GPU": 2.0}) is None


def test_a_replacement_that_cannot_be_placed_is_tried_elsewhere(cluster, monkeypatch, capsys):
    """The first replacement waits past cluster.actor_start_timeout_s on the node chosen for
    it: it is not fatal, the next one goes to another node."""
    from rlhf_ray.config.ppo import load_config
    from rlhf_ray.distributed import rollout_pool
    from rlhf_ray.distributed.actors import PlacementTimeoutError

    pool = rollout_pool.RolloutPool(load_config(None, ["rollout.num_workers=2"]))
    pool.workers = ["w0", "w1"]
    monkeypatch.setattr(rollout_pool, "kill_actors", lambda handles: None)
    tried = []

    def grow(n, strategy=None):
        tried.append(strategy.node_id if strategy is not None else None)
        if len(tried) == 1:
            raise PlacementTimeoutError("actors still pending")
        pool.workers.append("new")

    monkeypatch.setattr(pool, "grow", grow)
    monkeypatch.setattr(replacement, "actor_node", lambda handle: None)  # lost: node unknown
    monkeypatch.setattr(  # the faked nodes' ids are names, not Ray's hex ids
        replacement,
        "NodeAffinitySchedulingStrategy",
        lambda node_id, soft: types.SimpleNamespace(node_id=node_id, soft=soft),
    )
    pool._replace(0, "died while generating")
    assert pool.workers == ["new", "w1"]
    assert tried[0] == "second" and tried[1] != "second"
    assert "had its replacement not placed on node second" in capsys.readouterr().out


def test_a_node_is_suspect_only_for_a_while(cluster, monkeypatch):
    health = NodeHealth()
    health.lost("second")
    assert health.suspect("second") and not health.suspect("head")
    now = replacement.time.monotonic()
    monkeypatch.setattr(replacement.time, "monotonic", lambda: now + replacement.SUSPECT_S + 1)
    assert not health.suspect("second")
    assert health.healthy_node({"CPU": 1.0}) == "second"  # chosen again


def test_a_replacement_that_dies_before_it_is_ready_is_replaced_in_turn(monkeypatch, capsys):
    import ray

    from rlhf_ray.config.ppo import load_config
    from rlhf_ray.distributed import rollout_pool

    pool = rollout_pool.RolloutPool(load_config(None, ["rollout.num_workers=3"]))
    pool.workers = ["w0", "w1", "w2"]
    monkeypatch.setattr(rollout_pool, "kill_actors", lambda handles: None)
    monkeypatch.setattr(replacement, "actor_node", lambda handle: "second")
    monkeypatch.setattr(NodeHealth, "strategy", lambda self, needs: None)
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


def test_a_restarted_learner_group_avoids_suspect_and_silent_nodes_but_not_every_node(cluster):
    from ray._private.label_utils import validate_label_selector

    free, silent = cluster
    health = NodeHealth()
    assert health.avoid() == []  # nothing lost, every node answers
    health.lost("second")
    assert health.avoid() == ["second"]
    selector = replacement.avoid_selector(["second", "head"])
    assert selector == {"ray.io/node-id": "!in(head,second)"}
    assert validate_label_selector(selector) is None  # Ray accepts it
    silent.add("head")  # the last live node misses its heartbeat too
    assert health.avoid() == []  # avoiding every node would only delay the placement
    assert health.suspect("head")


class FakeGroup:
    def __init__(self, placed: bool):
        self.placed, self.removed = placed, False

    def wait(self, timeout_seconds: int) -> bool:
        return self.placed


def test_a_learner_group_that_cannot_be_placed_off_suspect_nodes_is_placed_anywhere(
    monkeypatch, capsys
):
    from rlhf_ray.distributed import learner_group

    made: list[tuple[list, FakeGroup]] = []
    placed = iter([True, False])

    def fake_placement_group(bundles, strategy, name, bundle_label_selector=None):
        made.append((bundle_label_selector, FakeGroup(next(placed))))
        return made[-1][1]

    monkeypatch.setattr(learner_group, "placement_group", fake_placement_group)
    monkeypatch.setattr(
        learner_group, "remove_placement_group", lambda pg: setattr(pg, "removed", True)
    )
    assert learner_group._place_off("policy", [{"CPU": 1}] * 2, [], 600) is None  # nothing to avoid
    pg = learner_group._place_off("policy", [{"CPU": 1}] * 2, ["second"], 600)
    assert pg is made[0][1] and made[0][0] == [{"ray.io/node-id": "!in(second)"}] * 2
    assert learner_group._place_off("value", [{"CPU": 1}], ["second"], 600) is None
    assert made[1][1].removed  # the pending group is removed before the one placed anywhere
    out = capsys.readouterr().out
    assert "value learner group could not be placed off the suspect node(s) second" in out


class FakeActor:
    def __init__(self, name: str):
        self.name = name
        self._actor_id = type("Id", (), {"hex": lambda _: name})()


def _workers(monkeypatch):
    """A RayWorkers with fake actors: the replacement logic without a cluster."""
    from rlhf_ray.config.ppo import load_config
    from rlhf_ray.distributed import runtime

    workers = object.__new__(runtime.RayWorkers)
    workers.cfg = load_config(None, [])
    workers.pool = type("Pool", (), {"health": NodeHealth()})()
    workers.scorers = {"reference-0": FakeActor("reference-0"), "reward-0": FakeActor("reward-0")}
    workers.scorer_restarts = workers.learner_restarts = 0
    workers._ray_restarts = {}
    workers.learners = []
    monkeypatch.setattr(runtime, "kill_actors", lambda handles: None)
    monkeypatch.setattr(replacement, "actor_node", lambda handle: "second")
    monkeypatch.setattr(NodeHealth, "strategy", lambda self, needs: None)
    return runtime, workers


def test_a_scorer_replacement_that_dies_before_it_is_ready_is_replaced_in_turn(monkeypatch, capsys):
    import ray

    runtime, workers = _workers(monkeypatch)
    made = iter(FakeActor(f"new-{i}") for i in range(10))
    monkeypatch.setattr(workers, "_respawn_scorer", lambda name, strategy: next(made))
    deaths = iter([True, True, False])  # two replicas die on the dying node, then one lives

    def wait_ready(handles, timeout):
        if next(deaths):
            raise ray.exceptions.ActorDiedError()

    monkeypatch.setattr(runtime, "wait_ready", wait_ready)
    monkeypatch.setattr(runtime, "score_call", lambda scorer, name, rows: (scorer.name, rows))
    assert workers._retry_scorer("reward-0", {"reward-0": "rows"}) == ("new-2", "rows")
    assert workers.scorers["reward-0"].name == "new-2"
    assert workers.scorer_restarts == 3 and workers.pool.health.replacements == 3
    out = capsys.readouterr().out
    assert "reward-0 was lost during score (node second)" in out
    assert out.count("reward-0 had its replacement die before it was ready (ActorDiedError)") == 2

    deaths = iter([True] * replacement.MAX_TRIES)
    with pytest.raises(RuntimeError, match="replacements in a row died before they were ready"):
        workers._retry_scorer("reference-0", {"reference-0": "rows"})


def test_restarts_ray_makes_of_a_scorer_itself_are_counted_once(monkeypatch, capsys):
    runtime, workers = _workers(monkeypatch)
    restarts = {"reference-0": 0, "reward-0": 0}
    monkeypatch.setattr(runtime, "actor_restarts", lambda handle: restarts[handle.name])
    workers._count_ray_restarts()
    assert workers.pool.health.replacements == 0
    restarts["reward-0"] = 2  # its node was lost twice; Ray placed it again each time
    workers._count_ray_restarts()
    workers._count_ray_restarts()  # seen already
    assert workers.pool.health.replacements == 2
    out = capsys.readouterr().out
    assert "reward-0 was restarted by Ray (restart 2 of 3)" in out


def test_a_learner_group_restart_that_dies_before_it_is_ready_is_restarted_in_turn(
    monkeypatch, capsys
):
    import ray

    from rlhf_ray.workers.interface import LearnerLostError

    runtime, workers = _workers(monkeypatch)
    avoided: list[list[str]] = []
    monkeypatch.setattr(NodeHealth, "lost_dead", lambda self, handles: ["second"])
    monkeypatch.setattr(NodeHealth, "avoid", lambda self: ["second"])
    monkeypatch.setattr(workers, "_kill_learners", lambda: None)
    monkeypatch.setattr(workers, "_make_learners", lambda cfg, avoid: avoided.append(avoid))
    monkeypatch.setattr(runtime, "wait_ready", lambda handles, timeout: None)
    deaths = iter([ray.exceptions.ActorDiedError(), LearnerLostError("policy-1 died"), None])

    def start():
        if (exc := next(deaths)) is not None:
            raise exc

    monkeypatch.setattr(workers, "_start_learners", start)
    workers.restart_learners()
    assert avoided == [["second"]] * 3  # each try placed off the node that lost the rank
    assert workers.pool.health.replacements == 3
    out = capsys.readouterr().out
    assert "the learner groups lost a rank (node second); replacing it" in out
    assert "had a restarted rank die before it was ready (LearnerLostError)" in out

    deaths = iter([LearnerLostError("policy-0 died")] * replacement.MAX_TRIES)
    with pytest.raises(LearnerLostError, match="died 4 times while starting"):
        workers.restart_learners()


def test_a_stage_learner_group_restart_is_bounded_and_counted_in_its_rows(monkeypatch, capsys):
    import ray

    from rlhf_ray.distributed import stages
    from rlhf_ray.workers.interface import LearnerLostError

    stage = object.__new__(stages.RayStage)
    stage.role = type("Role", (), {"name": "sft"})()
    stage.restarts, stage.health, stage._data = 0, NodeHealth(), ()
    stage.group = type("Group", (), {"actors": [], "kill": lambda self: None})()
    monkeypatch.setattr(NodeHealth, "lost_dead", lambda self, handles: ["second"])
    monkeypatch.setattr(NodeHealth, "avoid", lambda self: ["second"])
    deaths = iter([True, False])

    def start(avoid):
        assert avoid == ["second"]
        if next(deaths):
            raise ray.exceptions.ActorDiedError()

    monkeypatch.setattr(stage, "_start", start)
    stage.restart()
    assert stage.restarts == 1 and stage.health.replacements == 2
    out = capsys.readouterr().out
    assert "the sft learner group lost a rank (node second); replacing it" in out
    monkeypatch.setattr(stage, "_all", lambda phase, refs: [{"loss": 1.0}, {"loss": 3.0}])
    stage.group.call = lambda *args: []
    row = stage.train_step(0, 0)
    assert row == {"loss": 2.0, "learner_restarts": 1.0, "replacements": 2.0}

    deaths = iter([True] * replacement.MAX_TRIES)
    with pytest.raises(LearnerLostError, match="died 4 times while starting"):
        stage.restart()


def test_a_rank_whose_peer_failed_first_in_a_collective_is_reported_as_lost(monkeypatch):
    """A SIGKILLed rank's peer fails in gloo ("Connection reset by peer") and that task error
    may come back before the rank's death: it is still a lost learner, which recovery handles."""
    import ray

    from rlhf_ray.distributed import actors
    from rlhf_ray.workers.interface import LearnerLostError

    reset = ray.exceptions.RayTaskError("train", "", RuntimeError("Connection reset by peer"))
    outcome: dict[str, Exception | None] = {}

    def wait(refs, num_returns=1, timeout=None, **kwargs):
        return refs[:num_returns], refs[num_returns:]

    def get(refs, timeout=None):
        for ref in refs if isinstance(refs, list) else [refs]:
            if outcome[ref] is not None:
                raise outcome[ref]
        return refs

    monkeypatch.setattr(actors.ray, "wait", wait)
    monkeypatch.setattr(actors.ray, "get", get)
    outcome.update({"p0": reset, "p1": ray.exceptions.ActorDiedError()})
    with pytest.raises(LearnerLostError, match="learner policy-1 died during update"):
        actors.get_all(["p0", "p1"], ["policy-0", "policy-1"], "update")
    outcome["p1"] = None  # the peer is fine: the failure is the rank's own, and raised as such
    with pytest.raises(ray.exceptions.RayTaskError):
        actors.get_all(["p0", "p1"], ["policy-0", "policy-1"], "update")


class _FakeWorker:
    """A rollout worker handle whose ``load_bucket.remote`` records the bucket it is sent."""

    def __init__(self, loaded: list):
        outer = self

        class _Method:
            def remote(self, ref, version, index, count):
                loaded.append((outer, ref, version))
                return ref

        self.load_bucket = _Method()


def test_a_joining_worker_gets_lost_buckets_by_a_resync_within_the_phase_timeout(monkeypatch):
    """Policy rank 0's node held the buckets and died: a replacement's load raises
    ObjectLostError; the pool syncs the current version again and loads that, never waiting
    longer than train.phase_timeout_s on one load."""
    import ray

    from rlhf_ray.config.ppo import load_config
    from rlhf_ray.distributed import rollout_pool

    pool = rollout_pool.RolloutPool(load_config(None, ["train.phase_timeout_s=42"]))
    loaded: list = []
    monkeypatch.setattr(pool, "_spawn", lambda strategy=None: ("rollout-9", _FakeWorker(loaded)))
    monkeypatch.setattr(rollout_pool, "wait_ready", lambda handles, timeout: None)
    monkeypatch.setattr(rollout_pool, "kill_actors", lambda handles: None)
    pool.begin(3, 1)
    pool._buckets = ["lost"]
    timeouts = []

    def get(refs, timeout=None):
        timeouts.append(timeout)
        if "lost" in refs:
            raise ray.exceptions.OwnerDiedError("ff" * 28, None, "")
        return refs

    monkeypatch.setattr(rollout_pool.ray, "get", get)
    with pytest.raises(ray.exceptions.ObjectLostError):  # without a resync: the error stands
        pool.grow(1)

    def resync():
        pool.begin(pool.version, 1)
        pool._buckets = ["again"]

    pool.resync = resync
    pool.grow(1)
    assert len(pool.workers) == 1
    assert [(ref, version) for _, ref, version in loaded[-1:]] == [("again", 3)]
    assert timeouts and all(t == 42 for t in timeouts)
