"""On Ray, the pool size does not change the run: 1 rollout worker, or 3 shrunk to 2 mid-run,
give bit-identical rollouts (metrics) and final policy weights."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from rlhf_ray.config import load_config
from rlhf_ray.control import request_rollout_workers
from rlhf_ray.distributed import RayWorkers
from rlhf_ray.driver import run_ppo
from rlhf_ray.metrics import read_metrics

pytestmark = pytest.mark.ray

OVERRIDES = ["policy.engine=torch", "policy.num_ranks=1", "value.engine=torch",
             "train.rounds=3", "rollout.batch_size=8", "ppo.minibatch_size=4", "ppo.epochs=2",
             "rollout.max_new_tokens=8", "rollout.micro_batch_size=3", "rollout.top_k=20",
             "rollout.top_p=0.9", "logging.progress=false"]  # fmt: skip


def _shrink_to_two_after_a_round(run_dir, stop):
    while not stop.is_set():
        path = run_dir / "metrics.jsonl"
        if path.exists() and path.read_text().strip():
            request_rollout_workers(run_dir, 2)
            return
        time.sleep(0.01)


def _run(run_dir, workers_first: int, during=None):
    cfg = load_config(None, [*OVERRIDES, "rollout.num_workers=1"])
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("{}")
    request_rollout_workers(run_dir, workers_first)
    stop = threading.Event()
    thread = threading.Thread(target=during, args=(run_dir, stop)) if during else None
    workers = RayWorkers(cfg)
    if thread:
        thread.start()
    try:
        run_ppo(cfg, workers, run_dir)
    finally:
        stop.set()
        if thread:
            thread.join()
        workers.close()
    return read_metrics(run_dir / "metrics.jsonl")


def test_one_worker_and_a_resized_pool_give_bit_identical_runs(ray_cluster, tmp_path):
    one = _run(tmp_path / "one", 1)
    resized = _run(tmp_path / "resized", 3, _shrink_to_two_after_a_round)
    counts = [r["rollout/num_workers"] for r in resized]
    assert counts[0] == 3 and counts[-1] == 2 and [r["rollout/num_workers"] for r in one] == [1] * 3
    keys = ["rollout/reward_mean", "rollout/response_length", "rollout/logprob_gap", "ppo/kl",
            "ppo/policy_loss", "ppo/value_loss", "ppo/entropy"]  # fmt: skip
    assert [[r[k] for k in keys] for r in resized] == [[r[k] for k in keys] for r in one]
    a, b = (load_file(tmp_path / n / "policy" / "model.safetensors") for n in ("one", "resized"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
