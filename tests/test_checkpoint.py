"""Checkpoints and exact resume, in one process: a run that crashes after a checkpoint and is
resumed ends exactly where the uninterrupted run does."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf_ray.checkpoint import latest_checkpoint
from rlhf_ray.config import load_config
from rlhf_ray.driver import run_ppo
from rlhf_ray.errors import UserError
from rlhf_ray.metrics import read_metrics
from rlhf_ray.workers.inprocess import InProcessWorkers

BASE = ["policy.engine=torch", "policy.num_ranks=1", "value.engine=torch", "train.rounds=6",
        "rollout.batch_size=8", "ppo.minibatch_size=4", "checkpoint.every=2",
        "logging.progress=false", "ppo.adaptive_kl=true"]  # fmt: skip
COMPARED = ["round", "rollout/reward_mean", "ppo/kl", "ppo/kl_coef", "ppo/policy_loss",
            "ppo/value_loss", "weights/version"]  # fmt: skip


class CrashAt(InProcessWorkers):
    """In-process workers whose update raises in round ``crash_round`` (a killed driver)."""

    def __init__(self, cfg, crash_round: int):
        super().__init__(cfg)
        self.crash_round = crash_round

    def update(self, batch, round_index):
        if round_index == self.crash_round:
            raise RuntimeError("simulated crash")
        return super().update(batch, round_index)


def _rows(path):
    return [{k: r[k] for k in COMPARED} for r in read_metrics(path / "metrics.jsonl")]


def test_resume_after_a_crash_matches_the_uninterrupted_run(tmp_path):
    cfg = load_config(None, BASE)
    run_ppo(cfg, InProcessWorkers(cfg), tmp_path / "whole")

    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_ppo(cfg, CrashAt(cfg, crash_round=4), crashed)
    assert latest_checkpoint(crashed).name == "round_000003"
    assert len(read_metrics(crashed / "metrics.jsonl")) == 4
    # a half-written checkpoint of a later crash is never picked
    (crashed / "checkpoints" / ".tmp-round_000005").mkdir()

    run_ppo(cfg, InProcessWorkers(cfg), crashed, resume=True)
    resumed_rows, whole_rows = _rows(crashed), _rows(tmp_path / "whole")
    assert len(resumed_rows) == len(whole_rows)
    for got, want in zip(resumed_rows, whole_rows, strict=True):
        assert got == pytest.approx(want)
    whole = AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "policy").state_dict()
    resumed = AutoModelForCausalLM.from_pretrained(crashed / "policy").state_dict()
    for name, value in whole.items():
        assert torch.equal(value, resumed[name]), name


def test_resume_refuses_a_config_that_changes_the_computation(tmp_path):
    cfg = load_config(None, BASE)
    run_ppo(cfg, InProcessWorkers(cfg), tmp_path)
    changed = load_config(None, [*BASE, "ppo.clip_eps=0.3"])
    with pytest.raises(UserError, match=r"ppo\.clip_eps"):
        run_ppo(changed, InProcessWorkers(changed), tmp_path, resume=True)
    longer = load_config(None, [*BASE, "train.rounds=7"])  # more rounds is fine
    run_ppo(longer, InProcessWorkers(longer), tmp_path, resume=True)
    assert [r["round"] for r in read_metrics(tmp_path / "metrics.jsonl")] == list(range(7))


def test_resume_without_a_checkpoint_starts_over(tmp_path):
    cfg = load_config(None, [*BASE, "checkpoint.every=0", "train.rounds=2"])
    (tmp_path / "metrics.jsonl").write_text('{"round": 0}\n')
    run_ppo(cfg, InProcessWorkers(cfg), tmp_path, resume=True)
    assert [r["round"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1]
