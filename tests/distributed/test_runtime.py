"""The Ray runtime on a local cluster: ZeRO sharding and equivalence, weight-sync parity,
versioned samples, and pool sizes that leave the learners untouched."""

from __future__ import annotations

import time

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from rlhf_ray.config.ppo import load_config
from rlhf_ray.data.tokenization import build_tokenizer
from rlhf_ray.distributed import RayWorkers
from rlhf_ray.distributed.plan import resource_plan
from rlhf_ray.observe.metrics import read_metrics
from rlhf_ray.ppo.loop import build_kl_controller, build_prompts, compute_advantages, run_ppo
from rlhf_ray.types import PromptBatch
from rlhf_ray.workers.inprocess import InProcessWorkers
from rlhf_ray.workers.interface import StaleWeightsError, check_sync
from rlhf_ray.workers.scorers import ReferenceScorer, RewardScorer

pytestmark = pytest.mark.ray

SMALL = [
    "rollout.batch_size=8",
    "ppo.minibatch_size=4",
    "rollout.max_new_tokens=8",
    "train.rounds=2",
    "logging.progress=false",
]


def small_cfg(*overrides: str):
    return load_config(None, [*SMALL, *overrides])


def policy_weights(run_dir) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(run_dir / "policy")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_zero3_shards_and_matches_zero1_and_in_process(ray_cluster, tmp_path):
    results, held = {}, {}
    for stage in (3, 1):
        cfg = small_cfg("train.rounds=1", f"policy.zero_stage={stage}")
        workers = RayWorkers(cfg)
        try:
            held[stage] = workers.param_counts["policy"]
            run_ppo(cfg, workers, tmp_path / f"zero{stage}")
        finally:
            workers.close()
        results[stage] = policy_weights(tmp_path / f"zero{stage}")
    cfg = small_cfg(
        "train.rounds=1", "policy.engine=torch", "policy.num_ranks=1", "value.engine=torch"
    )
    run_ppo(cfg, InProcessWorkers(cfg), tmp_path / "inprocess")
    results["in-process"] = policy_weights(tmp_path / "inprocess")

    # ZeRO-3: each of the 2 ranks holds about half of the parameters
    (local0, total), (local1, _) = held[3]
    assert abs(local0 - total / 2) / total < 0.01 and abs(local1 - total / 2) / total < 0.01
    assert held[1][0][0] == total  # ZeRO-1 keeps full parameters on every rank

    initial = InProcessWorkers(cfg).policy.full_weights()
    moved = max((results[3][k] - torch.from_numpy(initial[k][0])).abs().max() for k in initial)
    assert moved > 1e-4, "the update did not change the weights"
    for other in (1, "in-process"):
        for name, value in results[3].items():
            torch.testing.assert_close(value, results[other][name], atol=2e-5, rtol=1e-4)


def test_sync_parity_versions_and_stale_refusal(ray_cluster):
    """Weights streamed in many small buckets from ZeRO-3 ranks reach every worker whole;
    two scorer replicas per role score like one scorer."""
    cfg = small_cfg("policy.zero_stage=3", "sync.bucket_mb=0.02", "reference.num_replicas=2",
                    "reward.num_replicas=2", "reference.num_cpus=0.125",
                    "reward.num_cpus=0.125")  # fmt: skip
    tok = build_tokenizer(cfg.tokenizer)
    prompts = build_prompts(cfg, tok)[:8]
    ids, mask = tok.encode_batch_left_padded(prompts, cfg.data.max_prompt_tokens)
    batch = PromptBatch(ids, mask, torch.arange(8), prompts)
    probe_ids, probe_mask = tok.encode_batch_left_padded(["Tell me about the sea."], 48)
    kl_ctl = build_kl_controller(cfg.ppo)
    workers = RayWorkers(cfg)
    try:
        for version in range(3):
            workers.sync(version)
            learner = ray.get(workers.policy.call("greedy", probe_ids, probe_mask, 12))
            sampled = ray.get(
                [w.greedy.remote(probe_ids, probe_mask, 12) for w in workers.pool.workers]
            )
            for out in sampled:
                assert torch.equal(out, learner[0])
            # the sync check (a ZeRO-3 collective on the learners): worker == learner exactly
            assert check_sync(workers, cfg.sync, version) == {"sync/logprob_max_abs_diff": 0.0}
            rollout = workers.generate(batch, version, version)
            assert rollout.weight_version.tolist() == [version] * 8
            if version == 0:  # replicas split the rows; one local scorer scores them all
                scored = workers.score(rollout)
                one_ref = ReferenceScorer(cfg.policy.model, cfg.tokenizer, 1.0)
                one_reward = RewardScorer(cfg.reward, cfg.tokenizer)
                torch.testing.assert_close(scored["ref_logprobs"], one_ref.logprobs(rollout))
                torch.testing.assert_close(scored["scores"], one_reward.score(rollout))
            with pytest.raises(StaleWeightsError):
                workers.generate(batch, version, version + 1)
            ppo_batch, _ = compute_advantages(
                rollout, workers.score(rollout), kl_ctl.value, cfg.ppo
            )
            workers.update(ppo_batch, version)
    finally:
        workers.close()


def test_rollout_pool_size_leaves_learners_alone_and_a_second_run_is_refused(ray_cluster, tmp_path):
    """3 rollout workers instead of the default 2: the learner groups are planned the same;
    every actor is found by name; a second run in the same namespace is refused while this
    one runs, and leaves it intact."""
    from rlhf_ray.errors import UserError

    num_workers = 3
    cfg = small_cfg(f"rollout.num_workers={num_workers}")
    base = small_cfg()
    learners = [r for r in resource_plan(cfg) if r.role in ("policy", "value")]
    assert learners == [r for r in resource_plan(base) if r.role in ("policy", "value")]
    workers = RayWorkers(cfg)
    try:
        names = [f"rollout-{i}" for i in range(num_workers)]
        names += ["policy-0", "policy-1", "value-0", "reference-0", "reward-0"]
        for name in names:  # operators find every actor by name
            assert ray.get(ray.get_actor(name, namespace="rlhf_ray").ping.remote()) is not None
        with pytest.raises(ValueError):
            ray.get_actor(f"rollout-{num_workers}", namespace="rlhf_ray")
        with pytest.raises(UserError, match="namespace 'rlhf_ray'"):
            RayWorkers(base)
        run_ppo(cfg, workers, tmp_path / "run")  # the first run is intact
    finally:
        workers.close()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["rollout/num_workers"] for r in rows] == [num_workers] * 2
    assert [r["rollout/num_samples"] for r in rows] == [8, 8]


@ray.remote(num_cpus=1.5)
class _Blocker:
    def ping(self) -> bool:
        return True


def test_actors_that_stay_pending_fail_clearly_and_leave_nothing(ray_cluster):
    from rlhf_ray.errors import UserError

    blocker = _Blocker.remote()  # another job holds 1.5 of the 2 CPUs: the run fits, in theory
    ray.get(blocker.ping.remote())
    try:
        with pytest.raises(UserError, match="could not be placed|pending"):
            RayWorkers(small_cfg("cluster.actor_start_timeout_s=3"))
    finally:
        ray.kill(blocker)
    # everything the failed start created is gone: no actor or placement group is left
    from ray._private import state as ray_state

    def alive() -> list[str]:
        return [a["Name"] for a in ray_state.actors().values() if a["State"] == "ALIVE"]

    deadline = time.monotonic() + 20  # ray.kill (of the blocker too) takes effect shortly
    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert alive() == []
    groups = ray.util.placement_group_table().values()
    assert [g["name"] for g in groups if g["state"] != "REMOVED"] == []


def test_a_phase_runs_on_the_cpus_the_run_holds_on_its_node(ray_cluster):
    """jobs/arithmetic_cpu.yaml's shape on 2 CPUs (policy 1, reference and reward 0.25 each,
    one rollout worker 0.5): generation and the update each run alone and get both cores; in
    the score phase the policy and the reference work at once and keep one thread each, as
    the policy and the worker do in the sync."""
    cfg = small_cfg(
        "algo.estimator=grpo",
        "rollout.samples_per_prompt=2",
        "policy.num_ranks=1",
        "policy.num_cpus_per_rank=1",
        "reference.num_cpus=0.25",
        "reward.num_cpus=0.25",
        "rollout.num_workers=1",
        "rollout.num_cpus_per_worker=0.5",
    )
    tok = build_tokenizer(cfg.tokenizer)
    prompts = build_prompts(cfg, tok)[:4]
    ids, mask = tok.encode_batch_left_padded(prompts, cfg.data.max_prompt_tokens)
    rows = torch.arange(4).repeat_interleave(2)  # groups of 2 samples per prompt
    batch = PromptBatch(ids[rows], mask[rows], rows, [prompts[i] for i in rows])
    workers = RayWorkers(cfg)
    try:
        policy, reference = workers.policy.actors[0], workers.scorers["reference-0"]
        rollout_worker = workers.pool.workers[0]

        def threads(*actors) -> list[int]:
            return ray.get([a.num_threads.remote() for a in actors])

        assert threads(policy, reference, rollout_worker) == [1, 1, 1]  # their CPU shares
        workers.sync(0)
        rollout = workers.generate(batch, 0, 0)
        assert threads(rollout_worker) == [2]
        scored = workers.score(rollout)
        assert threads(policy, reference) == [1, 1]
        ppo_batch, _ = compute_advantages(
            rollout, scored, 0.0, cfg.ppo, cfg.algo, cfg.rollout.samples_per_prompt
        )
        workers.update(ppo_batch, 0)
        assert threads(policy) == [2]
        workers.sync(1)  # the policy and the worker copy buckets at once: one core each
        assert threads(policy, rollout_worker) == [1, 1]
        workers.generate(batch, 1, 1)
        assert threads(rollout_worker, policy) == [2, 1]
    finally:
        workers.close()
