"""A hung (SIGSTOPped) rollout worker is replaced after ``train.phase_timeout_s`` and its shard redone; a
policy rank SIGKILLed mid-run is recovered from the last checkpoint. Both runs end with every
sample of every round and the same final policy (so equal to the uninterrupted run's)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch
from ray._private import state as ray_state
from safetensors.torch import load_file

from rlhf_ray.checkpoint import latest_checkpoint
from rlhf_ray.config import load_config
from rlhf_ray.distributed import RayWorkers
from rlhf_ray.metrics import read_metrics
from rlhf_ray.recovery import run_ppo_recovering

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROUNDS = 4
OVERRIDES = ["rollout.batch_size=8", "ppo.minibatch_size=4", "rollout.max_new_tokens=8",
             f"train.rounds={ROUNDS}", "checkpoint.every=1", "train.phase_timeout_s=20",
             "logging.progress=false"]  # fmt: skip


def _pid(name: str) -> int:
    return next(a["Pid"] for a in ray_state.actors().values()
                if a["Name"] == name and a["State"] == "ALIVE")  # fmt: skip


def _signal_when(name: str, sig: int, rows: int):
    """Once ``rows`` rounds are logged and a checkpoint is complete, send ``sig`` to the process
    of actor ``name`` (SIGSTOP: it hangs, answering nothing; SIGKILL: it dies as in a crash)."""

    def act(run_dir, stop: threading.Event) -> None:
        pid = _pid(name)
        path = run_dir / "metrics.jsonl"
        while not stop.is_set():
            logged = len(path.read_text().splitlines()) if path.exists() else 0
            if logged >= rows and latest_checkpoint(run_dir) is not None:
                os.kill(pid, sig)
                return
            time.sleep(0.05)

    return act


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


@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("recovery")
    _run(root / "hung", _signal_when("rollout-1", signal.SIGSTOP, rows=1))
    _run(root / "killed", _signal_when("policy-1", signal.SIGKILL, rows=2))
    return root


def test_a_hung_rollout_worker_is_replaced_and_its_shard_redone(runs):
    rows = read_metrics(runs / "hung" / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(ROUNDS))
    assert [r["rollout/num_samples"] for r in rows] == [8] * ROUNDS
    assert rows[0]["rollout/worker_restarts"] == 0 and rows[-1]["rollout/worker_restarts"] == 1
    print("round times", [round(r["time/round"], 1) for r in rows], "(phase_timeout_s 20)")


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
