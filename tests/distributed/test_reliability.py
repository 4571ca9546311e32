"""What a running job survives: dead workers and scorers replaced, and a driver stopped and
resumed from its checkpoint under DeepSpeed ZeRO; nothing lost or changed either way (a pool
resized 1 -> 3 -> 2: tests/distributed/test_pool_invariance.py)."""

from __future__ import annotations

import shutil
import threading
import time

import pytest
import ray

from rlhf_ray.config.ppo import load_config
from rlhf_ray.distributed import RayWorkers
from rlhf_ray.observe.metrics import read_metrics
from rlhf_ray.ppo.loop import run_ppo
from rlhf_ray.workers.inprocess import InProcessWorkers

pytestmark = pytest.mark.ray


def _run_beside(cfg, run_dir, target, *args) -> None:
    """Run PPO on Ray while ``target(run_dir, *args, stop)`` acts on it from a thread."""
    stop = threading.Event()
    thread = threading.Thread(target=target, args=(run_dir, *args, stop))
    workers = RayWorkers(cfg)
    thread.start()
    try:
        run_ppo(cfg, workers, run_dir)
    finally:
        stop.set()
        thread.join()
        workers.close()


def _kill_when(run_dir, plan: list[tuple[int, str]], killed: list[str],
               stop: threading.Event) -> None:  # fmt: skip
    """For each (rows, name): once metrics.jsonl has ``rows`` rows, kill actor ``name`` the way
    a crash would (Ray may restart it if it allows restarts)."""
    path = run_dir / "metrics.jsonl"
    for rows, name in plan:
        while not stop.is_set():
            if path.exists() and len(path.read_text().splitlines()) >= rows:
                ray.kill(ray.get_actor(name, namespace="rlhf_ray"), no_restart=False)
                killed.append(name)
                break
            time.sleep(0.02)


def test_dead_rollout_worker_and_scorers_are_replaced_and_their_work_redone(ray_cluster, tmp_path):
    overrides = ["rollout.batch_size=8", "ppo.minibatch_size=4", "rollout.max_new_tokens=8",
                 "train.rounds=6", "logging.progress=false"]  # fmt: skip
    cfg = load_config(None, overrides)
    run_dir = tmp_path / "run"
    deaths = [(2, "rollout-1"), (3, "reference-0"), (4, "reward-0")]
    killed: list[str] = []
    _run_beside(cfg, run_dir, _kill_when, deaths, killed)
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert killed == [name for _, name in deaths]  # each died while the run went on
    assert rows[-1]["rollout/worker_restarts"] == 1
    assert [r["rollout/num_workers"] for r in rows] == [2] * 6
    assert [r["rollout/num_samples"] for r in rows] == [8] * 6
    # same seeds and weights for the redone shard: the run is the one without the failure
    cfg_ref = load_config(None, [*overrides, "policy.num_ranks=1", "policy.engine=torch",
                                 "value.engine=torch"])  # fmt: skip
    run_ppo(cfg_ref, InProcessWorkers(cfg_ref), tmp_path / "reference")
    expected = read_metrics(tmp_path / "reference" / "metrics.jsonl")
    for got, want in zip(rows, expected, strict=True):
        assert got["rollout/reward_mean"] == pytest.approx(want["rollout/reward_mean"], abs=1e-6)


def test_resume_under_zero3_matches_the_uninterrupted_run(ray_cluster, tmp_path):
    """A run of 4 rounds checkpoints after rounds 1 and 3. A copy of it without the last
    checkpoint is a run stopped after round 3 with its checkpoint at round 1: resumed, rounds 2-3
    are redone from the ZeRO-3 partitioned optimizer state and equal those of the run never
    stopped (on the same actors, their state replaced by the checkpoint's)."""
    overrides = ["rollout.batch_size=8", "ppo.minibatch_size=4", "rollout.max_new_tokens=8",
                 "checkpoint.every=2", "logging.progress=false", "policy.zero_stage=3",
                 "value.zero_stage=3", "train.rounds=4"]  # fmt: skip
    cfg = load_config(None, overrides)
    workers = RayWorkers(cfg)
    try:
        run_ppo(cfg, workers, tmp_path / "whole")
        shutil.copytree(tmp_path / "whole", tmp_path / "stopped")
        shutil.rmtree(tmp_path / "stopped" / "checkpoints" / "round_000003")
        run_ppo(cfg, workers, tmp_path / "stopped", resume=True)
    finally:
        workers.close()
    keys = ["round", "rollout/reward_mean", "ppo/kl", "ppo/policy_loss", "ppo/value_loss"]
    whole, resumed = (
        [{k: r[k] for k in keys} for r in read_metrics(tmp_path / name / "metrics.jsonl")]
        for name in ("whole", "stopped")
    )
    assert len(resumed) == len(whole) == 4
    for got, want in zip(resumed, whole, strict=True):
        assert got == pytest.approx(want)
