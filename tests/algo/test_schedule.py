"""The learning-rate schedule, by hand: warmup 2 of 6 steps, then linear / cosine decay."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_ray.algo.schedule import lr_multiplier
from rlhf_ray.config.ppo import OptimSpec
from rlhf_ray.engines.training import TorchEngine


@pytest.mark.parametrize(
    ("kind", "min_ratio", "expected"),
    [
        # warmup (s+1)/2; then the decay spans steps 2..5 (3 intervals) and ends at min_ratio
        ("constant", 0.0, [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
        ("linear", 0.0, [0.5, 1.0, 1.0, 2 / 3, 1 / 3, 0.0, 0.0]),
        ("linear", 0.1, [0.5, 1.0, 1.0, 0.7, 0.4, 0.1, 0.1]),
        ("cosine", 0.0, [0.5, 1.0, 1.0, 0.75, 0.25, 0.0, 0.0]),
    ],
)
def test_lr_multiplier_by_hand(kind, min_ratio, expected):
    got = [lr_multiplier(s, warmup=2, total=6, kind=kind, min_ratio=min_ratio) for s in range(7)]
    assert got == pytest.approx(expected, abs=1e-12)


def test_no_warmup_starts_at_the_peak():
    assert lr_multiplier(0, 0, 5, "cosine") == 1.0
    assert lr_multiplier(2, 0, 5, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))


def test_torch_engine_steps_the_schedule_per_optimizer_step_and_resumes_it(tmp_path):
    optim = OptimSpec(lr=1.0, lr_schedule="linear", warmup_steps=2)
    engine = TorchEngine(torch.nn.Linear(2, 1), optim, accumulation=2, total_steps=6)
    lrs = []
    for _ in range(4):  # 4 optimizer steps, each of 2 micro-batches
        for _ in range(2):
            engine.module(torch.ones(1, 2)).sum().backward()
            stepped = engine.step()
        assert stepped
        lrs.append(engine.lr())
    assert lrs == pytest.approx([1.0, 1.0, 2 / 3, 1 / 3])  # the lr of the NEXT step
    engine.save_state(str(tmp_path))
    fresh = TorchEngine(torch.nn.Linear(2, 1), optim, accumulation=2, total_steps=6)
    fresh.load_state(str(tmp_path))
    assert fresh.lr() == pytest.approx(1 / 3)
