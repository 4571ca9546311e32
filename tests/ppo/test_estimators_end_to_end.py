"""Critic-free estimators end to end: the ready jobs of jobs/ learn with groups of 4 samples per
prompt, a grpo run resumes exactly, pool sizes do not change a run, and on Ray no value actor
is started, nothing of a critic is saved and a rollout worker killed mid-round loses no sample
of any group.

The in-process runs use the job files with a shorter prompt and response (so CI stays fast);
the Ray run is the grpo job itself (2 policy ranks under ZeRO-2) with the same shortening, and
must match the in-process grpo run round by round.
"""

from __future__ import annotations

import time
from pathlib import Path
from statistics import mean

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf_ray.config.ppo import load_config
from rlhf_ray.observe.metrics import read_metrics
from rlhf_ray.ppo.checkpoint import latest_checkpoint
from rlhf_ray.ppo.loop import run_ppo
from rlhf_ray.workers.inprocess import InProcessWorkers
from tests.helpers.crashing_workers import CrashAt

JOBS = Path(__file__).resolve().parents[2] / "jobs"
ROUNDS = 12  # the tiny policy's reward takes off after about 8 rounds
SHORT = ["rollout.max_new_tokens=8", "data.max_prompt_tokens=16", f"train.rounds={ROUNDS}",
         "checkpoint.every=2", "logging.progress=false"]  # fmt: skip
IN_PROCESS = ["policy.engine=torch", "policy.num_ranks=1"]
SAMPLES = 8 * 4  # 8 prompts x 4 samples per round in every job


def _job(estimator: str, *overrides: str):
    return load_config(JOBS / f"{estimator}_cpu.yaml", [*SHORT, *overrides])


def _run_in_process(cfg, run_dir: Path) -> list[dict]:
    workers = InProcessWorkers(cfg)
    assert workers.value is None  # no critic is even built
    run_ppo(cfg, workers, run_dir)
    return read_metrics(run_dir / "metrics.jsonl")


def _no_critic_saved(run_dir: Path) -> None:
    assert (run_dir / "policy" / "config.json").exists()
    checkpoints = sorted((run_dir / "checkpoints").glob("round_*"))
    assert checkpoints, "the run wrote no checkpoint"
    for directory in [run_dir, *checkpoints]:
        assert not (directory / "value").exists() and not (directory / "value_state").exists()
    assert all((c / "policy_state").is_dir() for c in checkpoints)


def _rise(rows: list[dict]) -> tuple[float, float]:
    """Mean reward of the first two rounds and of the last two."""
    rewards = [r["rollout/reward_mean"] for r in rows]
    return mean(rewards[:2]), mean(rewards[-2:])


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory) -> tuple[object, Path]:
    """The grpo job in one process, ROUNDS rounds with checkpoints: the learning check, the
    uninterrupted run for the resume check and the reference of the Ray run."""
    cfg = _job("grpo", *IN_PROCESS)
    run_dir = tmp_path_factory.mktemp("grpo") / "run"
    _run_in_process(cfg, run_dir)
    return cfg, run_dir


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_pp"])
def test_each_critic_free_estimator_raises_the_reward(estimator, grpo_run, tmp_path):
    if estimator == "grpo":
        run_dir = grpo_run[1]
    else:
        run_dir = tmp_path / "run"
        _run_in_process(_job(estimator, *IN_PROCESS), run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    first, last = _rise(rows)
    print(f"{estimator}: reward_mean first 2 rounds {first:.3f}, last 2 rounds {last:.3f}")
    assert last > first + 0.08
    assert [r["rollout/num_samples"] for r in rows] == [SAMPLES] * ROUNDS
    assert not any("value" in key or "explained_variance" in key for r in rows for key in r)
    _no_critic_saved(run_dir)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(run_dir / "policy").state_dict()


def test_grpo_resumes_exactly_with_no_critic_saved(grpo_run, tmp_path):
    cfg, whole = grpo_run
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_ppo(cfg, CrashAt(cfg, crash_round=4), crashed)
    assert latest_checkpoint(crashed).name == "round_000003"
    run_ppo(cfg, InProcessWorkers(cfg), crashed, resume=True)
    keys = ["round", "rollout/reward_mean", "ppo/kl", "ppo/kl_loss", "ppo/policy_loss",
            "ppo/clipfrac", "weights/version"]  # fmt: skip
    got, want = (
        [{k: r[k] for k in keys} for r in read_metrics(d / "metrics.jsonl")]
        for d in (crashed, whole)
    )
    assert len(got) == len(want) == ROUNDS
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w)
    resumed, uninterrupted = _weights(crashed), _weights(whole)
    for name, value in uninterrupted.items():
        assert torch.equal(value, resumed[name]), name
    _no_critic_saved(crashed)


def test_rollout_pool_sizes_one_and_three_give_identical_runs(tmp_path):
    """Groups are split over the pool (16 rows over 3 workers: 5, 6, 5): per-sample seeding
    makes the run independent of the pool size."""
    runs = {}
    for n in (1, 3):
        cfg = _job("grpo", *IN_PROCESS, "train.rounds=2", "rollout.batch_size=4",
                   f"rollout.num_workers={n}")  # fmt: skip
        rows = _run_in_process(cfg, tmp_path / f"pool{n}")
        runs[n] = [r[k] for r in rows for k in ("rollout/reward_mean", "ppo/policy_loss")]
    assert runs[1] == pytest.approx(runs[3], abs=1e-6)
    one, three = _weights(tmp_path / "pool1"), _weights(tmp_path / "pool3")
    for name, value in one.items():
        torch.testing.assert_close(value, three[name], rtol=0, atol=1e-6)


# -- on Ray ---------------------------------------------------------------------------------------


def _crash(name: str) -> None:
    """Kill actor ``name`` the way a crash would, and wait until Ray reports it dead."""
    import ray

    handle = ray.get_actor(name, namespace="rlhf_ray")
    ray.kill(handle, no_restart=False)
    while True:
        try:
            ray.get(handle.ping.remote(), timeout=5)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return
        time.sleep(0.05)


@pytest.mark.ray
@pytest.mark.slow
def test_grpo_on_ray_starts_no_critic_and_a_dead_worker_loses_no_sample(
    ray_cluster, grpo_run, tmp_path, capsys
):
    import ray

    from rlhf_ray.distributed import RayWorkers

    class Recording(RayWorkers):
        """RayWorkers that list the named actors in round 1, crash rollout-1 once round 2 has
        begun (before its shard is done), and keep every round's prompt index and weight
        version per sample."""

        rounds: list[tuple[list[int], list[int]]] = []
        actors: set[str] = set()

        def generate(self, prompts, round_index, version):
            if round_index == 1:
                self.actors |= {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
            if round_index == 2:
                _crash("rollout-1")
            rollout = super().generate(prompts, round_index, version)
            self.rounds.append((rollout.prompt_index.tolist(), rollout.weight_version.tolist()))
            return rollout

    # the job itself (2 policy ranks under DeepSpeed ZeRO-2), patient with a busy machine
    cfg = _job("grpo", "cluster.actor_start_timeout_s=600")
    run_dir = tmp_path / "run"
    workers = Recording(cfg)
    try:
        run_ppo(cfg, workers, run_dir)
    finally:
        workers.close()

    # the actor graph: policy ranks, scorers and the pool; no value actor at all
    assert {
        "policy-0",
        "policy-1",
        "reference-0",
        "reward-0",
        "rollout-0",
        "rollout-1",
    } <= workers.actors
    assert not any(name.startswith("value") for name in workers.actors)
    _no_critic_saved(run_dir)

    # the worker died mid-round and was replaced, its shard redone; every round still has all
    # 4 samples of each of its 8 groups, in consecutive rows, made with that round's weights
    assert "rollout worker 1 died while generating; its shard is redone" in capsys.readouterr().out
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert rows[-1]["rollout/worker_restarts"] == 1
    assert len(workers.rounds) == ROUNDS
    for round_index, (prompt_index, versions) in enumerate(workers.rounds):
        groups = [prompt_index[g * 4 : (g + 1) * 4] for g in range(8)]
        assert all(len(set(group)) == 1 for group in groups)
        assert versions == [round_index] * SAMPLES
    # the redone shard used the same seeds and weights: the run is the in-process one
    expected = read_metrics(grpo_run[1] / "metrics.jsonl")
    for got, want in zip(rows, expected, strict=True):
        assert got["rollout/reward_mean"] == pytest.approx(want["rollout/reward_mean"], abs=1e-5)
    first, last = _rise(rows)
    print(f"grpo on Ray: reward_mean first 2 rounds {first:.3f}, last 2 rounds {last:.3f}")
    assert last > first + 0.08
