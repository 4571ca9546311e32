"""Streaming weights in buckets: the plan of buckets by hand, and a worker that ends with the
learner's exact weights, loading bucket by bucket, refusing to sample until the last arrives."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.config.ppo import load_config
from rlhf_ray.models.weights import plan_buckets
from rlhf_ray.types import PromptBatch
from rlhf_ray.workers.interface import StaleWeightsError
from rlhf_ray.workers.learners import PolicyLearner
from rlhf_ray.workers.rollout import RolloutGenerator
from rlhf_ray.workers.sync import stream_buckets


def test_plan_buckets_by_hand():
    assert plan_buckets([3, 3, 5, 1], 6) == [[0, 1], [2, 3]]
    assert plan_buckets([7, 2, 2, 2], 6) == [[0], [1, 2, 3]]  # too big: travels alone
    assert plan_buckets([1, 1, 1], 100) == [[0, 1, 2]]
    assert plan_buckets([], 6) == []


def test_streamed_buckets_overlap_gather_and_load_in_order():
    events: list[str] = []

    def start(k):
        events.append(f"start {k}")
        return lambda: events.append(f"got {k}") or k

    stream_buckets(3, start, lambda bucket, k: events.append(f"load {k}"))
    # bucket k+1 is being gathered while bucket k loads; never more than two in flight
    assert events == ["start 0", "got 0", "start 1", "load 0", "got 1", "start 2", "load 1",
                      "got 2", "load 2"]  # fmt: skip


def test_worker_gets_the_learners_exact_weights_bucket_by_bucket():
    cfg = load_config(None, ["policy.engine=torch", "policy.num_ranks=1", "sync.bucket_mb=0.01"])
    learner = PolicyLearner(cfg.policy, cfg.ppo, cfg.tokenizer, 1.0)
    learner.setup()
    with torch.no_grad():  # make the learner's weights differ from a fresh worker's
        for p in learner.module.parameters():
            p.add_(torch.randn_like(p))
    worker = RolloutGenerator(cfg.policy.model, cfg.tokenizer, cfg.rollout)
    count = learner.num_weight_buckets(cfg.sync.bucket_mb)
    assert count > 5  # 10 KB buckets of a ~100K-parameter model
    prompts = PromptBatch(
        torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3), torch.zeros(1), [""]
    )
    for k in range(count):
        assert worker.version == -1
        worker.load_bucket(learner.weight_bucket(k, cfg.sync.bucket_mb), 7, k, count)
        if k < count - 1:
            with pytest.raises(StaleWeightsError):  # a mix of versions never samples
                worker.generate(prompts, 0, 7)
    assert worker.version == 7
    mine, theirs = learner.module.state_dict(), worker.model.state_dict()
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), name


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_a_worker_whose_weights_come_by_sync_reads_no_checkpoint(tmp_path, preset):
    """PPO's rollout workers are built from the model's config.json alone: with the weights
    file gone they still start, and after one sync they compute what the learner computes."""
    from rlhf_ray.data.tokenization import build_tokenizer
    from rlhf_ray.models import build_causal_lm

    cfg = load_config(
        None, ["policy.engine=torch", "policy.num_ranks=1", f"policy.model.preset={preset}"]
    )
    tok = build_tokenizer(cfg.tokenizer)
    build_causal_lm(cfg.policy.model, tok).save_pretrained(str(tmp_path))
    spec = cfg.policy.model.model_copy(update={"path": str(tmp_path)})
    policy_cfg = cfg.policy.model_copy(update={"model": spec})
    learner = PolicyLearner(policy_cfg, cfg.ppo, cfg.tokenizer, 1.0)
    learner.setup()
    for weights in tmp_path.glob("*.safetensors"):
        weights.unlink()
    worker = RolloutGenerator(spec, cfg.tokenizer, cfg.rollout, from_sync=True)
    count = learner.num_weight_buckets(cfg.sync.bucket_mb)
    for k in range(count):
        worker.load_bucket(learner.weight_bucket(k, cfg.sync.bucket_mb), 0, k, count)
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(learner.module(ids).logits, worker.model(ids).logits)
    with pytest.raises(OSError):  # while a model that needs its weights cannot load
        RolloutGenerator(spec, cfg.tokenizer, cfg.rollout)
