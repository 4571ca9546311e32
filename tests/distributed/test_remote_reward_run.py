"""One PPO run on Ray whose reward is a service (a standard-library server in a thread) plus a
function term reading each prompt's ``label`` column: GRPO with 4 samples per prompt over a
2-worker pool. Mid-run a rollout worker is killed (and replaced) and the service goes down for
about 15 s; afterwards the run is resumed for two more rounds. It learns, completes every round
with every sample, and every sample's reward saw its own prompt's label."""

from __future__ import annotations

import os
import signal
import threading
import time
from statistics import mean

import pytest
from ray._private import state as ray_state

from rlhf_ray.config.ppo import load_config
from rlhf_ray.distributed import RayWorkers
from rlhf_ray.observe.metrics import read_metrics
from rlhf_ray.ppo.dumps import read_dump
from rlhf_ray.ppo.loop import run_ppo
from tests.helpers.reward_fns import labelled_prompts
from tests.helpers.reward_servers import RewardServer

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROUNDS, MORE = 20, 2
OUTAGE_S = 15.0


def _rows(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _disrupt(run_dir, server: RewardServer, stop: threading.Event, log: dict) -> None:
    """After 3 rounds SIGKILL rollout-1; after 8 stop the service for OUTAGE_S seconds."""
    while not stop.is_set() and _rows(run_dir) < 3:
        time.sleep(0.05)
    pid = next(
        a["Pid"]
        for a in ray_state.actors().values()
        if a["Name"] == "rollout-1" and a["State"] == "ALIVE"
    )
    os.kill(pid, signal.SIGKILL)
    while not stop.is_set() and _rows(run_dir) < 8:
        time.sleep(0.05)
    server.stop()
    log["down_at_rows"] = _rows(run_dir)
    stop.wait(OUTAGE_S)
    server.start()  # the same port
    log["up_at_rows"] = _rows(run_dir)


@pytest.fixture(scope="module")
def run(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    server = RewardServer()
    prompts = labelled_prompts(root / "prompts.jsonl")
    term = "[{name: label, weight: 1.0, function: 'tests.helpers.reward_fns:label_term'}]"
    overrides = [
        f"data.prompts={prompts}",
        "rollout.batch_size=8",
        "ppo.minibatch_size=8",
        "rollout.samples_per_prompt=4",
        "algo.estimator=grpo",
        "rollout.num_workers=2",
        "reward.function=null",
        f"reward.remote.url={server.url}",
        f"reward.terms={term}",
        "checkpoint.every=5",
        "logging.dump_rollouts_every=1",
        "logging.progress=false",
        "train.phase_timeout_s=120",
    ]
    run_dir, log, stop = root / "run", {}, threading.Event()
    workers = RayWorkers(load_config(None, [*overrides, f"train.rounds={ROUNDS}"]))
    thread = threading.Thread(target=_disrupt, args=(run_dir, server, stop, log))
    thread.start()
    try:
        run_ppo(load_config(None, [*overrides, f"train.rounds={ROUNDS}"]), workers, run_dir)
        stop.set()
        thread.join()
        cfg = load_config(None, [*overrides, f"train.rounds={ROUNDS + MORE}"])
        run_ppo(cfg, workers, run_dir, resume=True)
    finally:
        stop.set()
        thread.join()
        workers.close()
        server.stop()
    return run_dir, server, log


def test_the_run_learns_the_services_reward(run):
    rows = read_metrics(run[0] / "metrics.jsonl")[:ROUNDS]
    first, last = (mean(r["rollout/reward_mean"] for r in part) for part in (rows[:5], rows[-5:]))
    label_first, label_last = (
        mean(r["reward/label_mean"] for r in p) for p in (rows[:5], rows[-5:])
    )
    print(
        f"remote reward: total {first:.3f} -> {last:.3f}, label term {label_first:.3f} -> "
        f"{label_last:.3f}"
    )
    assert last >= first + 0.05
    assert label_last > label_first


def test_every_round_completes_with_every_sample_through_outage_and_replacement(run):
    run_dir, _, log = run
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(ROUNDS + MORE))
    assert all(r["rollout/num_samples"] == 32 for r in rows)
    assert sum(r["reward/remote_retries"] for r in rows) > 0, log
    assert rows[ROUNDS - 1]["rollout/worker_restarts"] >= 1
    assert all(r["reward/remote_latency_s"] > 0 for r in rows)


def test_every_sample_got_its_own_prompts_label(run):
    run_dir, server, _ = run
    for r in range(ROUNDS + MORE):  # the resumed rounds too
        for row in read_dump(run_dir / f"rollouts/round_{r:06d}.jsonl"):
            assert row["prompt"].endswith(f"item {row['columns']['label']}.")
            assert row["score"] == pytest.approx(sum(row["score_parts"].values()), abs=1e-6)
    sent = [
        (p, m["label"])
        for b in server.requests
        for p, m in zip(b["prompts"], b["metadata"], strict=True)
    ]
    assert len(sent) >= (ROUNDS + MORE) * 32
    assert all(p.endswith(f"item {label}.") for p, label in sent)
