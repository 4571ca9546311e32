"""In one run: a hung (SIGSTOPped) rollout worker is replaced after ``train.phase_timeout_s``
and its shard redone, then a policy rank SIGKILLed mid-run is recovered from the last
checkpoint. The run ends with every sample of every round and the policy of the run never
disturbed (in process, one rank)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch
from ray._private import state as ray_state
from safetensors.torch import load_file

from rlhf_ray.config.ppo import load_config
from rlhf_ray.distributed import RayWorkers
from rlhf_ray.observe.metrics import read_metrics
from rlhf_ray.ppo.checkpoint import latest_checkpoint
from rlhf_ray.ppo.loop import run_ppo
from rlhf_ray.ppo.recovery import run_ppo_recovering
from rlhf_ray.workers.inprocess import InProcessWorkers

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


def _run(run_dir, beside=None, transport: str = "object_store") -> None:
    cfg = load_config(None, [*OVERRIDES, f"sync.transport={transport}"])
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


@pytest.fixture(scope="module", params=["object_store", "collective"])
def runs(ray_cluster, tmp_path_factory, request):
    """The disrupted run syncs over each ``sync.transport`` in turn (the collective group is
    formed again for the hung worker's replacement and for the restarted policy rank 0)."""
    root = tmp_path_factory.mktemp("recovery")
    hang = _signal_when("rollout-1", signal.SIGSTOP, rows=1)
    kill = _signal_when("policy-1", signal.SIGKILL, rows=2)

    def disrupt(run_dir, stop):
        hang(run_dir, stop)
        kill(run_dir, stop)

    _run(root / "disrupted", disrupt, request.param)
    cfg = load_config(None, [*OVERRIDES, "policy.engine=torch", "policy.num_ranks=1",
                             "value.engine=torch"])  # fmt: skip
    run_ppo(cfg, InProcessWorkers(cfg), root / "undisturbed")
    return root


def test_a_hung_rollout_worker_is_replaced_and_its_shard_redone(runs):
    rows = read_metrics(runs / "disrupted" / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(ROUNDS))
    assert [r["rollout/num_samples"] for r in rows] == [8] * ROUNDS
    assert rows[0]["rollout/worker_restarts"] == 0 and rows[-1]["rollout/worker_restarts"] == 1
    print("round times", [round(r["time/round"], 1) for r in rows], "(phase_timeout_s 20)")


def test_a_killed_policy_rank_is_recovered_from_the_last_checkpoint(runs):
    rows = read_metrics(runs / "disrupted" / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(ROUNDS))  # every round, once
    assert rows[-1]["train/learner_restarts"] == 1
    assert rows[0]["train/learner_restarts"] == 0


def test_the_recovered_run_ends_with_the_undisturbed_policy(runs):
    """Same samples and steps: equal up to float rounding (2 ZeRO ranks against 1 plain)."""
    disrupted = load_file(runs / "disrupted" / "policy" / "model.safetensors")
    undisturbed = load_file(runs / "undisturbed" / "policy" / "model.safetensors")
    assert disrupted.keys() == undisturbed.keys()
    for name, value in undisturbed.items():
        torch.testing.assert_close(disrupted[name], value, atol=2e-5, rtol=1e-4)
    rows, want = (read_metrics(runs / n / "metrics.jsonl") for n in ("disrupted", "undisturbed"))
    for got, expected in zip(rows, want, strict=True):
        assert got["rollout/reward_mean"] == pytest.approx(
            expected["rollout/reward_mean"], abs=1e-6
        )
