"""Learner ranks in one process: micro-batch accumulation and gradient checkpointing change
memory, never the gradient of the token-mean loss over the minibatch."""

from __future__ import annotations

import os
import socket
import types

import pytest
import torch

import rlhf_ray.engines.training as training
from rlhf_ray.config.ppo import load_config
from rlhf_ray.types import PPOBatch
from rlhf_ray.workers.learners import PolicyLearner, ValueLearner

ROWS, PROMPT, RESPONSE = 8, 4, 6


SEEN: list[list[torch.Tensor]] = []  # the gradients of each optimizer step


@pytest.fixture(autouse=True)
def record(monkeypatch):
    """AdamW that keeps the gradients it is asked to step with (after accumulation, before the
    update), so runs compare gradients, not post-Adam weights."""
    make_adamw = training.make_adamw

    def make(module, optim):
        optimizer = make_adamw(module, optim)
        step = optimizer.step

        def recording_step(self, *args, **kwargs):
            SEEN.append([p.grad.detach().clone() for g in self.param_groups
                         for p in g["params"]])  # fmt: skip
            return step(*args, **kwargs)

        optimizer.step = types.MethodType(recording_step, optimizer)  # type: ignore[method-assign]
        return optimizer

    monkeypatch.setattr(training, "make_adamw", make)
    SEEN.clear()


def ppo_batch(vocab: int) -> PPOBatch:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (ROWS, PROMPT + RESPONSE), generator=g)
    attention = torch.ones(ROWS, PROMPT + RESPONSE, dtype=torch.long)
    attention[::3, :2] = 0  # some left-padded prompts
    # responses of different lengths: token weighting must be exact across micro-batches
    lengths = torch.tensor([6, 1, 3, 6, 2, 5, 4, 6])
    response_mask = (torch.arange(RESPONSE) < lengths[:, None]).long()
    attention[:, PROMPT:] = response_mask
    return PPOBatch(
        input_ids=ids,
        attention_mask=attention,
        response_mask=response_mask,
        old_logprobs=-torch.rand(ROWS, RESPONSE, generator=g) - 5.0,
        old_values=torch.randn(ROWS, RESPONSE, generator=g),
        advantages=torch.randn(ROWS, RESPONSE, generator=g),
        returns=torch.randn(ROWS, RESPONSE, generator=g),
        ref_logprobs=-torch.rand(ROWS, RESPONSE, generator=g) - 5.0,
        prompt_len=PROMPT,
    )


def join_world_of_one(learner) -> None:
    """A DeepSpeed learner in this process: a gloo world of one rank on a free port."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    learner.init_process_group("127.0.0.1", port, 60)


def grads_of(role: str, *overrides: str) -> list[torch.Tensor]:
    """The gradient of one PPO minibatch (the whole batch) on one rank."""
    cfg = load_config(
        None,
        [f"rollout.batch_size={ROWS}", f"ppo.minibatch_size={ROWS}", "ppo.epochs=1",
         "policy.num_ranks=1", f"{role}.optim.grad_clip=1e9", *overrides],
    )  # fmt: skip
    if role == "policy":
        learner = PolicyLearner(cfg.policy, cfg.ppo, cfg.tokenizer, 1.0)
    else:
        learner = ValueLearner(cfg.value, cfg.ppo, cfg.tokenizer)
    if "deepspeed" in overrides[0]:
        join_world_of_one(learner)
    learner.setup()
    SEEN.clear()
    learner.train(ppo_batch(learner.module.config.vocab_size), 0)
    assert len(SEEN) == 1, "one minibatch is one optimizer step"
    return SEEN[0]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    assert any(float(x.abs().max()) > 0 for x in a)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("role", ["policy", "value"])
def test_four_micro_batches_give_the_gradient_of_one(role):
    engine = f"{role}.engine=torch"
    whole = grads_of(role, engine)
    accumulated = grads_of(role, engine, "ppo.micro_batch_size=2")
    assert_same(whole, accumulated)


@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "seq_mean_token_sum"])
def test_micro_batches_are_exact_for_per_sequence_aggregation(agg):
    """Sequence-weighted losses (GRPO, Dr. GRPO) with a KL term accumulate exactly too."""
    extra = (f"ppo.loss_agg={agg}", "ppo.kl_coef=0", "ppo.kl_in_loss=k3", "ppo.entropy_coef=0.01")
    whole = grads_of("policy", "policy.engine=torch", *extra)
    accumulated = grads_of("policy", "policy.engine=torch", "ppo.micro_batch_size=2", *extra)
    assert_same(whole, accumulated)


def test_deepspeed_accumulates_to_the_same_gradient():
    """DeepSpeed's accumulation boundary agrees with the learner's (else the step raises),
    and its accumulated gradient is the one-pass gradient."""
    whole = grads_of("policy", "policy.engine=deepspeed", "policy.zero_stage=2")
    accumulated = grads_of(
        "policy", "policy.engine=deepspeed", "policy.zero_stage=2", "ppo.micro_batch_size=2"
    )
    assert_same(whole, accumulated)


@pytest.mark.parametrize("role", ["policy", "value"])
def test_gradient_checkpointing_gives_the_same_gradient(role):
    engine = f"{role}.engine=torch"
    plain = grads_of(role, engine)
    checkpointed = grads_of(role, engine, f"{role}.gradient_checkpointing=true")
    assert_same(plain, checkpointed)


def test_zero3_loads_a_checkpoint_into_partitions(tmp_path):
    """Under ZeRO-3 a model from a path is loaded inside deepspeed.zero.Init (through
    transformers' DeepSpeed integration): its parameters are partitions from the start, and
    they hold the checkpoint's weights."""
    from rlhf_ray.data.tokenization import build_tokenizer
    from rlhf_ray.models import build_causal_lm

    base = load_config(None, [])
    saved = build_causal_lm(base.policy.model, build_tokenizer(base.tokenizer))
    saved.save_pretrained(tmp_path / "model")
    cfg = load_config(
        None, ["policy.num_ranks=1", "policy.zero_stage=3", f"policy.model.path={tmp_path}/model"]
    )
    learner = PolicyLearner(cfg.policy, cfg.ppo, cfg.tokenizer, 1.0)
    join_world_of_one(learner)
    learner.setup()
    assert all(hasattr(p, "ds_id") for p in learner.module.parameters())
    built = learner.full_weights()
    assert built is not None
    for name, tensor in saved.state_dict().items():
        torch.testing.assert_close(torch.from_numpy(built[name][0]), tensor, rtol=0, atol=0)


def test_default_engine_is_torch_for_one_rank_and_deepspeed_for_a_group():
    """engine auto resolves where the rank is placed: one rank in process trains with plain
    AdamW, each rank of a 2-rank group on Ray with DeepSpeed."""
    cfg = load_config(None, ["ppo.minibatch_size=8"])
    assert cfg.policy.engine == "auto" and cfg.policy.num_ranks == 2
    alone = PolicyLearner(cfg.policy, cfg.ppo, cfg.tokenizer, 1.0)
    ranks = [PolicyLearner(cfg.policy, cfg.ppo, cfg.tokenizer, 1.0, r, 2) for r in range(2)]
    assert alone.engine_name == "torch"
    assert [r.engine_name for r in ranks] == ["deepspeed", "deepspeed"]
    alone.setup()
    assert isinstance(alone.engine, training.TorchEngine)
