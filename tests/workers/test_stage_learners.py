"""The stages train through PPO's minibatch step: for SFT and the reward model, a step over
micro-batches (gradient accumulation) is the step over the whole batch, gradient checkpointing
and a DeepSpeed ZeRO-2 engine change memory, never the step, and the LR schedule spans every
optimizer step of the stage."""

from __future__ import annotations

import functools
import os
import socket

import pytest
import torch

from rlhf_ray.config.stages import load_rm_config, load_sft_config, stage_tokenizer
from rlhf_ray.data.stage_data import encode_pairs, encode_sft, load_pairs, load_sft_examples
from rlhf_ray.data.tokenization import build_tokenizer
from rlhf_ray.stages import rm_role, sft_role

ROWS = 8  # one batch: one optimizer step per epoch
BASE = [
    "learner.engine=torch",
    "learner.num_ranks=1",
    f"train.batch_size={ROWS}",
    "optim.grad_clip=1e9",  # compare steps, not clipping
    "optim.lr=1e-4",  # Adam's first step is lr * g / (|g| + eps): rounding in g stays below 1e-6
    "data.max_tokens=48",
    "data.max_prompt_tokens=32",
]


@functools.cache
def stage_data(kind: str, rows: int):
    """The first ``rows`` examples (sft) or pairs (rm) of the bundled HH-RLHF sample."""
    tokenizer = build_tokenizer(stage_tokenizer(load_sft_config()))
    if kind == "sft":
        examples, _ = load_sft_examples("builtin:hh-rlhf")
        return encode_sft(examples[:rows], tokenizer, 48, 32)
    pairs, _ = load_pairs("builtin:hh-rlhf", "auto", "train", False)
    return encode_pairs(pairs[:rows], tokenizer, 48, 32)


def stage_learner(kind: str, *overrides: str, rows: int = ROWS):
    """A set-up stage learner rank holding ``rows`` training examples."""
    load, role = (load_sft_config, sft_role) if kind == "sft" else (load_rm_config, rm_role)
    cfg = load(None, [*BASE, *overrides])
    built = role(cfg)
    learner = built.cls(built.role_cfg, **built.kwargs)
    if cfg.learner.engine == "deepspeed":  # a gloo world of one rank in this process
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        learner.init_process_group("127.0.0.1", port, 60)
    learner.setup()
    learner.load_data(stage_data(kind, rows))
    return learner


def weights(learner) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in learner.module.state_dict().items()}


def one_step(kind: str, *overrides: str) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The weights after the first optimizer step, and its stats (checked to be a step)."""
    learner = stage_learner(kind, *overrides)
    before = weights(learner)
    stats = learner.train_step(0, 0)
    after = weights(learner)
    assert stats["skipped_steps"] == 0 and torch.isfinite(torch.tensor(stats["loss"]))
    assert any(not torch.equal(before[k], v) for k, v in after.items()), "the step moved nothing"
    return after, stats


def assert_same_step(a, b) -> None:
    (wa, sa), (wb, sb) = a, b
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-6)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key] == pytest.approx(sb[key], rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("kind", ["sft", "rm"])
def test_four_micro_batches_take_the_step_of_the_whole_batch(kind):
    accumulating = stage_learner(kind, "train.micro_batch_size=2")
    assert accumulating.accumulation == 4
    assert_same_step(one_step(kind), one_step(kind, "train.micro_batch_size=2"))


@pytest.mark.parametrize("kind", ["sft", "rm"])
def test_gradient_checkpointing_takes_the_same_step(kind):
    assert_same_step(one_step(kind), one_step(kind, "learner.gradient_checkpointing=true"))


@pytest.mark.parametrize("kind", ["sft", "rm"])
def test_a_zero2_stage_accumulates_to_the_same_step(kind):
    """A DeepSpeed ZeRO-2 stage learner: its accumulation boundary agrees with the learner's
    (else the step raises) and micro-batches take the whole batch's step."""
    zero2 = ("learner.engine=deepspeed", "learner.zero_stage=2")
    assert_same_step(one_step(kind, *zero2), one_step(kind, *zero2, "train.micro_batch_size=2"))


def test_the_lr_schedule_spans_every_step_of_the_stage():
    """2 epochs of 2 steps: a linear decay to 0 reaches it at the 4th and last step."""
    learner = stage_learner(
        "sft",
        "train.epochs=2",
        "optim.lr=0.01",
        "optim.lr_schedule=linear",
        "optim.min_lr_ratio=0",
        rows=2 * ROWS,
    )
    assert learner.engine is not None
    lrs = []
    for epoch in range(2):
        for step in range(2):
            lrs.append(learner.engine.lr())  # the LR this step is taken with
            learner.train_step(epoch, step)
    assert lrs == pytest.approx([0.01, 0.01 * 2 / 3, 0.01 / 3, 0.0])
