"""On Ray, the pool size does not change the run: 1 rollout worker, or a pool grown 1 -> 3 and
shrunk 3 -> 2 mid-run, give bit-identical rollouts (metrics) and final policy weights, and no
round loses a sample."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from rlhf_ray.config.ppo import load_config
from rlhf_ray.distributed import RayWorkers
from rlhf_ray.observe.metrics import read_metrics
from rlhf_ray.ppo.control import request_rollout_workers
from rlhf_ray.ppo.loop import run_ppo

pytestmark = pytest.mark.ray

OVERRIDES = ["policy.engine=torch", "policy.num_ranks=1", "value.engine=torch",
             "train.rounds=5", "rollout.batch_size=8", "ppo.minibatch_size=4", "ppo.epochs=2",
             "rollout.max_new_tokens=8", "rollout.micro_batch_size=3", "rollout.top_k=20",
             "rollout.top_p=0.9", "logging.progress=false"]  # fmt: skip


def _grow_then_shrink(run_dir, stop):
    """3 workers once a round is logged, 2 once three are (each applies at a round's start)."""
    path = run_dir / "metrics.jsonl"
    for rows, workers in ((1, 3), (3, 2)):
        while not stop.is_set():
            if path.exists() and len(path.read_text().splitlines()) >= rows:
                request_rollout_workers(run_dir, workers)
                break
            time.sleep(0.01)


def _run(run_dir, workers_first: int, during=None, transport: str = "object_store"):
    cfg = load_config(None, [*OVERRIDES, "rollout.num_workers=1", f"sync.transport={transport}"])
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


@pytest.mark.parametrize("transport", ["object_store", "collective"])
def test_one_worker_and_a_resized_pool_give_bit_identical_runs(ray_cluster, tmp_path, transport):
    """The resized run syncs over ``transport`` (the collective group is formed again at every
    change of the pool); the one-worker run over the object store."""
    one = _run(tmp_path / "one", 1)
    resized = _run(tmp_path / "resized", 1, _grow_then_shrink, transport)
    counts = [r["rollout/num_workers"] for r in resized]
    # 1 worker, then 3, then 2 until the end, each for at least one round
    first3, first2 = counts.index(3), counts.index(2)
    assert 1 <= first3 < first2
    assert counts == [1] * first3 + [3] * (first2 - first3) + [2] * (len(counts) - first2)
    assert [r["rollout/num_workers"] for r in one] == [1] * 5
    # every round trained on every sample, with that round's weights
    assert [r["rollout/num_samples"] for r in resized] == [8] * 5
    assert [r["weights/version"] for r in resized] == list(range(5))
    keys = ["rollout/reward_mean", "rollout/response_length", "rollout/logprob_gap", "ppo/kl",
            "ppo/policy_loss", "ppo/value_loss", "ppo/entropy"]  # fmt: skip
    assert [[r[k] for k in keys] for r in resized] == [[r[k] for k in keys] for r in one]
    a, b = (load_file(tmp_path / n / "policy" / "model.safetensors") for n in ("one", "resized"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
