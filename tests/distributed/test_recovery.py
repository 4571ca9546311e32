"""A hung rollout worker is replaced after ``train.phase_timeout_s`` and its shard redone; a
policy rank SIGKILLed mid-run is recovered from the last checkpoint. Both runs end with every
sample of every round and the same final policy (so equal to the uninterrupted run's)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import cloudpickle
import pytest
import ray
import torch
from safetensors.torch import load_file

from rlhf_ray.config import load_config
from rlhf_ray.distributed import RayWorkers
from rlhf_ray.distributed.runtime import RolloutPool
from rlhf_ray.metrics import read_metrics
from rlhf_ray.recovery import run_ppo_recovering
from rlhf_ray.workers.rollout import RolloutGenerator

pytestmark = [pytest.mark.ray, pytest.mark.slow]
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/

ROUNDS = 4
OVERRIDES = ["rollout.batch_size=8", "ppo.minibatch_size=4", "rollout.max_new_tokens=8",
             f"train.rounds={ROUNDS}", "checkpoint.every=1", "train.phase_timeout_s=20",
             "logging.progress=false"]  # fmt: skip


class HangsOnce(RolloutGenerator):
    """Rollout worker 1 hangs in round 1 (its replacement, a new id, does not)."""

    def generate(self, prompts, seed, expected_version):
        if self.worker_id == 1 and expected_version == 1:
            time.sleep(3600)
        return super().generate(prompts, seed, expected_version)


def _run(run_dir, beside=None) -> None:
    cfg = load_config(None, OVERRIDES)
    workers = RayWorkers(cfg)
    stop = threading.Event()
    thread = threading.Thread(target=beside, args=(run_dir, stop)) if beside else None
    if thread:
        thread.start()
    try:
        run_ppo_recovering(cfg, workers, run_dir)
    finally:
        stop.set()
        if thread:
            thread.join()
        workers.close()


def _kill_policy_rank_when(run_dir, stop: threading.Event) -> None:
    """Once two rounds are logged, SIGKILL the process of policy rank 1 (by its PID)."""
    pid = ray.get(ray.get_actor("policy-1", namespace="rlhf_ray").pid.remote())
    path = run_dir / "metrics.jsonl"
    while not stop.is_set():
        if path.exists() and len(path.read_text().splitlines()) >= 2:
            os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.05)


@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("recovery")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RolloutPool, "generator_cls", HangsOnce)
        _run(root / "hung")
    _run(root / "killed", _kill_policy_rank_when)
    return root


def test_a_hung_rollout_worker_is_replaced_and_its_shard_redone(runs):
    rows = read_metrics(runs / "hung" / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(ROUNDS))
    assert [r["rollout/num_samples"] for r in rows] == [8] * ROUNDS
    assert [r["rollout/worker_restarts"] for r in rows] == [0, 1, 1, 1]
    print("hung round took", rows[1]["time/generate"], "s (phase_timeout_s 20)")


def test_a_killed_policy_rank_is_recovered_from_the_last_checkpoint(runs):
    rows = read_metrics(runs / "killed" / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(ROUNDS))  # every round, once
    assert [r["rollout/num_samples"] for r in rows] == [8] * ROUNDS
    assert rows[-1]["train/learner_restarts"] == 1
    assert rows[0]["train/learner_restarts"] == 0


def test_the_recovered_run_ends_with_the_uninterrupted_policy(runs):
    hung = load_file(runs / "hung" / "policy" / "model.safetensors")
    killed = load_file(runs / "killed" / "policy" / "model.safetensors")
    assert hung.keys() == killed.keys()
    for name, value in hung.items():
        torch.testing.assert_close(killed[name], value, atol=1e-6, rtol=0)
