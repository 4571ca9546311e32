"""Two Ray nodes on this machine (``ray.cluster_utils.Cluster``), each with its own resources:
the learners are pinned to the head (``cluster.learner_resources``), rollout workers and scorers
spread over both. Killing the worker node's raylet (by PID) mid-round loses no sample: its
actors are replaced on the surviving node and their work redone."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time

import pytest
import ray
from conftest import wait_no_processes_under
from ray._private import ray_constants
from ray._private import state as ray_state

from rlhf_ray.config import load_config
from rlhf_ray.distributed import RayWorkers
from rlhf_ray.driver import run_ppo
from rlhf_ray.metrics import read_metrics

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROUNDS = 3
OVERRIDES = ["rollout.batch_size=8", "ppo.minibatch_size=4", "rollout.max_new_tokens=8",
             f"train.rounds={ROUNDS}", "train.phase_timeout_s=30", "logging.progress=false",
             "cluster.learner_resources={learner_node: 0.01}"]  # fmt: skip
OURS = ("reference", "reward", "rollout-")


def _placement() -> dict[str, str]:
    """Live actors of the run -> the node id they run on."""
    return {
        a["Name"]: a["Address"]["NodeID"]
        for a in ray_state.actors().values()
        if a["State"] == "ALIVE" and a["Name"].startswith(OURS)
    }


@pytest.fixture(scope="module")
def two_nodes():
    from ray.cluster_utils import Cluster

    temp_dir = tempfile.mkdtemp(prefix="rr2-", dir="/tmp")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "resources": {"learner_node": 1}, "temp_dir": temp_dir,
                        "include_dashboard": False},
    )  # fmt: skip
    worker = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, namespace="rlhf_ray", logging_level="WARNING")
    try:
        yield cluster, worker
    finally:
        ray.shutdown()
        cluster.shutdown()
        left = wait_no_processes_under(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"Ray processes outlived the test: {[p.pid for p in left]}"


def test_losing_a_node_mid_round_loses_no_sample(two_nodes, tmp_path):
    cluster, worker = two_nodes
    head_id, worker_id = cluster.head_node.node_id, worker.node_id
    cfg = load_config(None, OVERRIDES)
    run_dir = tmp_path / "run"
    before: dict[str, str] = {}

    def kill_worker_node(stop: threading.Event) -> None:
        path = run_dir / "metrics.jsonl"
        while not stop.is_set():
            if path.exists() and len(path.read_text().splitlines()) >= 1:  # round 1 under way
                before.update(_placement())
                raylet = worker.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process
                os.kill(raylet.pid, signal.SIGKILL)
                return
            time.sleep(0.05)

    workers = RayWorkers(cfg)
    stop = threading.Event()
    thread = threading.Thread(target=kill_worker_node, args=(stop,))
    thread.start()
    try:
        run_ppo(cfg, workers, run_dir)
        after = _placement()
    finally:
        stop.set()
        thread.join()
        workers.close()
    # spread: some rollout workers or scorers ran on the worker node before it was lost
    assert worker_id in before.values(), before
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(ROUNDS))
    assert [r["rollout/num_samples"] for r in rows] == [8] * ROUNDS
    assert [r["rollout/num_workers"] for r in rows] == [2] * ROUNDS
    # the replacements run on the surviving node
    assert set(after.values()) == {head_id}, after
