"""A LoRA critic on every engine: only its adapters and its head (``modules_to_save``) get
gradients, optimizer state and updates, with micro-batches and gradient checkpointing, and
its accumulated gradient is the one-pass gradient."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.config.ppo import load_config
from rlhf_ray.workers.learners import ValueLearner
from tests.workers.test_learners import (  # noqa: F401 (record: the AdamW-recording fixture)
    ROWS,
    SEEN,
    assert_same,
    grads_of,
    join_world_of_one,
    ppo_batch,
    record,
)

LORA = ["value.lora.r=4"]
ENGINES = {
    "torch": ["value.engine=torch"],
    **{f"zero{s}": ["value.engine=deepspeed", f"value.zero_stage={s}"] for s in (1, 2, 3)},
}


def weights(learner) -> dict[str, torch.Tensor]:
    """Every weight, whole (gathered under ZeRO-3)."""
    full = learner.full_weights()
    assert full is not None
    return {k: torch.from_numpy(v[0]).clone() for k, v in full.items()}


@pytest.mark.parametrize("engine", list(ENGINES))
def test_a_lora_critic_trains_its_adapters_and_head_alone(engine):
    cfg = load_config(
        None,
        [f"rollout.batch_size={ROWS}", f"ppo.minibatch_size={ROWS}", "ppo.epochs=1",
         "ppo.micro_batch_size=2", "value.gradient_checkpointing=true", *LORA, *ENGINES[engine]],
    )  # fmt: skip
    learner = ValueLearner(cfg.value, cfg.ppo, cfg.tokenizer)
    if engine != "torch":
        join_world_of_one(learner)
    learner.setup()
    trainable = {n for n, p in learner.module.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or ".score.modules_to_save." in n for n in trainable)
    assert any(".score.modules_to_save." in n for n in trainable)  # the head trains whole
    count = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                for n, p in learner.module.named_parameters() if n in trainable)  # fmt: skip
    before = weights(learner)
    SEEN.clear()
    learner.train(ppo_batch(learner.module.config.vocab_size), 0)
    # one optimizer step, over the trainable tensors alone (ZeRO: flat, padded partitions)
    assert len(SEEN) == 1
    assert count <= sum(g.numel() for g in SEEN[0]) <= count + 64
    after = weights(learner)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and moved <= trainable
    assert any("lora_B" in k for k in moved) and any("modules_to_save" in k for k in moved)


def test_a_lora_critic_accumulates_the_one_pass_gradient():
    whole = grads_of("value", "value.engine=torch", *LORA)
    parts = grads_of("value", "value.engine=torch", *LORA, "ppo.micro_batch_size=2",
                     "value.gradient_checkpointing=true")  # fmt: skip
    assert_same(whole, parts)
