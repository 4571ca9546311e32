"""The same run whatever the rollout pool does: rows seeded by (seed, round, prompt index, sample
index) and generated in micro-batches aligned to the round give bit-identical rollouts and
weights for 1 worker, 3 workers resized to 2 mid-run, and a run resumed on another pool size
(with running reward normalisation). Also: the sampler and the learner share the top-k /
top-p distribution, critic warm-up leaves the policy alone, and at policy == reference the KL
is 0 under top-k / top-p (the KL uses the unfiltered distribution on both sides)."""

from __future__ import annotations

import math
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from rlhf_ray.config.ppo import load_config
from rlhf_ray.data.tokenization import build_tokenizer
from rlhf_ray.models import build_causal_lm
from rlhf_ray.observe.metrics import read_metrics
from rlhf_ray.ppo.control import request_rollout_workers
from rlhf_ray.ppo.loop import run_ppo
from rlhf_ray.workers.inprocess import InProcessWorkers

BASE = ["policy.engine=torch", "policy.num_ranks=1", "value.engine=torch", "train.rounds=3",
        "rollout.batch_size=8", "ppo.minibatch_size=4", "rollout.max_new_tokens=8",
        "rollout.micro_batch_size=3", "rollout.top_p=0.9", "rollout.top_k=20",
        "reward.normalize=running", "ppo.epochs=2", "logging.progress=false"]  # fmt: skip


def _run(overrides, run_dir, resume=False, during=None):
    """run_ppo in process; returns the rollouts it generated. ``during(run_dir, stop)`` runs
    beside it in a thread."""
    cfg = load_config(None, [*BASE, *overrides])
    workers = InProcessWorkers(cfg)
    rollouts = []
    generate = workers.generate
    workers.generate = lambda *args: rollouts.append(generate(*args)) or rollouts[-1]  # type: ignore[method-assign]
    stop = threading.Event()
    thread = threading.Thread(target=during, args=(run_dir, stop)) if during else None
    if thread:
        thread.start()
    try:
        run_ppo(cfg, workers, run_dir, resume=resume)
    finally:
        stop.set()
        if thread:
            thread.join()
    return rollouts


def _shrink_to_two_after_a_round(run_dir, stop):
    while not stop.is_set():
        path = run_dir / "metrics.jsonl"
        if path.exists() and path.read_text().strip():
            request_rollout_workers(run_dir, 2)
            return
        time.sleep(0.01)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    out = {"root": root}
    out["one"] = _run(["rollout.num_workers=1", "checkpoint.every=2"], root / "one")
    (root / "resized").mkdir()
    (root / "resized" / "config.yaml").write_text("{}")
    request_rollout_workers(root / "resized", 3)
    out["resized"] = _run(["rollout.num_workers=1"], root / "resized",
                          during=_shrink_to_two_after_a_round)  # fmt: skip
    # stopped after round 1 (checkpoint at round 1), resumed on 2 workers
    _run(["rollout.num_workers=1", "checkpoint.every=2", "train.rounds=2"], root / "resumed")
    out["resumed"] = _run(["rollout.num_workers=2", "checkpoint.every=2"], root / "resumed",
                          resume=True)  # fmt: skip
    return out


def _weights(run_dir):
    return load_file(run_dir / "policy" / "model.safetensors")


def test_pool_size_resizes_and_resume_do_not_change_rollouts_or_weights(runs):
    root = runs["root"]
    counts = [r["rollout/num_workers"] for r in read_metrics(root / "resized" / "metrics.jsonl")]
    assert counts[0] == 3 and counts[-1] == 2  # really resized mid-run
    for one, resized in zip(runs["one"], runs["resized"], strict=True):
        for key in ("response_ids", "response_mask", "sampler_logprobs", "sample_index"):
            assert torch.equal(getattr(one, key), getattr(resized, key)), key
    for one, resumed in zip(runs["one"][2:], runs["resumed"], strict=True):
        assert torch.equal(one.response_ids, resumed.response_ids)
    reference = _weights(root / "one")
    for name in ("resized", "resumed"):
        other = _weights(root / name)
        assert reference.keys() == other.keys()
        assert all(torch.equal(reference[k], other[k]) for k in reference), name
    rows = {n: read_metrics(root / n / "metrics.jsonl") for n in ("one", "resized", "resumed")}
    keys = ["rollout/reward_mean", "reward/running_mean", "reward/running_std", "ppo/kl",
            "ppo/policy_loss", "ppo/value_loss"]  # fmt: skip
    for name in ("resized", "resumed"):
        assert [[r[k] for k in keys] for r in rows[name]] == [
            [r[k] for k in keys] for r in rows["one"]
        ]


def test_sampler_and_learner_agree_on_the_filtered_distribution(runs):
    rows = read_metrics(runs["root"] / "one" / "metrics.jsonl")
    gaps = [r["rollout/logprob_gap"] for r in rows]
    print(f"top_p=0.9 top_k=20: rollout/logprob_gap per round {gaps}")
    assert max(gaps) <= 1e-5
    assert all(r["rollout/outside_filter_tokens"] == 0 for r in rows)


def test_critic_warmup_leaves_the_policy_and_entropy_is_the_unfiltered_one(tmp_path):
    overrides = ["ppo.critic_warmup_rounds=3", "train.rounds=4", "rollout.top_k=2",
                 "rollout.top_p=1.0", "checkpoint.every=3", "value.optim.lr=0.01", "ppo.epochs=4",
                 "reward.normalize=none", "policy.optim.lr_schedule=linear",
                 "policy.optim.min_lr_ratio=0.1", "policy.optim.lr=0.001"]  # fmt: skip
    _run(overrides, tmp_path)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["ppo/critic_warmup"] for r in rows] == [1.0, 1.0, 1.0, 0.0]
    assert all("ppo/policy_loss" not in r for r in rows[:3]) and "ppo/policy_loss" in rows[3]
    losses = [r["ppo/value_loss"] for r in rows[:3]]
    assert losses[-1] < losses[0], losses
    cfg = load_config(None, BASE)
    initial = build_causal_lm(cfg.policy.model, build_tokenizer(cfg.tokenizer)).state_dict()
    after_warmup = load_file(
        tmp_path / "checkpoints" / "round_000002" / "policy" / "model.safetensors"
    )
    assert all(torch.equal(initial[k], after_warmup[k]) for k in after_warmup)
    # the policy's LR schedule spans only the round it trains in: it ends at min_lr_ratio * lr
    assert rows[3]["ppo/policy_lr"] == pytest.approx(0.1 * 0.001)
    # the logged entropy is the full distribution's, not the top-2 one's (at most log 2)
    assert rows[3]["ppo/entropy"] > math.log(2)


@pytest.mark.parametrize(
    "overrides",
    [
        ["rollout.top_p=1.0", "rollout.top_k=5", "ppo.kl_estimator=k3"],
        [
            "rollout.top_p=0.9",
            "rollout.top_k=0",
            "ppo.kl_coef=0",
            "ppo.kl_in_loss=k3",
            "ppo.minibatch_size=8",
        ],
    ],
    ids=["top_k_5_k3", "top_p_0.9_kl_in_loss"],
)
def test_kl_is_zero_at_policy_equal_reference_under_top_p_and_top_k(tmp_path, overrides):
    """Round 0, policy == reference: the filtered log-prob of a kept token is log p - log(kept
    mass), so a KL taken from it would be -log(kept mass) > 0 per token (0.045 nats at top_p
    0.9 on a tiny model); on the full distribution both sides agree and the KL is 0."""
    _run([*overrides, "train.rounds=1", "ppo.epochs=1", "reward.normalize=none"], tmp_path)
    row = read_metrics(tmp_path / "metrics.jsonl")[0]
    assert row["rollout/logprob_gap"] <= 1e-5  # the ratio still uses the sampler's filter
    assert abs(row["ppo/kl"]) <= 1e-5, row["ppo/kl"]
    if "ppo.kl_in_loss=k3" in overrides:
        assert abs(row["ppo/kl_loss"]) <= 1e-6, row["ppo/kl_loss"]
