"""The sampler/learner log-prob gap: a policy whose generation_config.json ships a
repetition_penalty and a no_repeat_ngram_size is still sampled from the distribution the learner
computes (gap at float error), and a round whose gap exceeds rollout.max_logprob_gap stops
before training, with an error naming the likely cause."""

from __future__ import annotations

import contextlib
import json

import pytest
from transformers import GenerationConfig

from rlhf_ray.config.ppo import load_config
from rlhf_ray.data.tokenization import TiktokenTokenizer
from rlhf_ray.engines import generation
from rlhf_ray.errors import UserError
from rlhf_ray.observe.metrics import read_metrics
from rlhf_ray.ppo.loop import run_ppo
from rlhf_ray.ppo.sampling_check import LogprobGapError, check_logprob_gap, gap_tolerance
from rlhf_ray.workers.inprocess import InProcessWorkers
from tests.helpers.model_dirs import save_policy

SMALL = ["policy.engine=torch", "policy.num_ranks=1", "value.engine=torch", "rollout.num_workers=1",
         "logging.progress=false", "train.rounds=1", "rollout.batch_size=8",
         "ppo.minibatch_size=8", "ppo.epochs=1", "rollout.max_new_tokens=12"]  # fmt: skip


@pytest.fixture(scope="module")
def shipped_penalties(tmp_path_factory):
    """A tiny byte-level policy whose generation_config.json asks for penalties."""
    directory = save_policy(tmp_path_factory.mktemp("policy"), TiktokenTokenizer.byte_level())
    path = directory / "generation_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    config |= {"repetition_penalty": 1.1, "no_repeat_ngram_size": 2}
    path.write_text(json.dumps(config))
    return directory


def _run(policy_dir, run_dir, *overrides):
    cfg = load_config(None, [*SMALL, f"policy.model.path={policy_dir}", *overrides])
    run_ppo(cfg, InProcessWorkers(cfg), run_dir)
    return read_metrics(run_dir / "metrics.jsonl")


def test_the_models_generation_config_does_not_reach_the_sampler(shipped_penalties, tmp_path):
    rows = _run(shipped_penalties, tmp_path)
    assert rows[0]["rollout/logprob_gap"] <= 1e-6


def test_a_round_off_the_learners_distribution_stops_naming_the_cause(
    shipped_penalties, tmp_path, monkeypatch
):
    # let the shipped generation_config.json leak into generate, as transformers does by default
    # for a model loaded with from_pretrained (PPO's workers are built from config.json alone
    # and never read it, so the leak is put in by hand)
    @contextlib.contextmanager
    def leaking(model):
        saved = model.generation_config
        model.generation_config = GenerationConfig.from_pretrained(shipped_penalties)
        try:
            yield
        finally:
            model.generation_config = saved

    monkeypatch.setattr(generation, "own_generation_config", leaking)
    with pytest.raises(LogprobGapError, match="generation_config.json") as caught:
        _run(shipped_penalties, tmp_path)
    assert "rollout.max_logprob_gap" in str(caught.value)
    assert not (tmp_path / "metrics.jsonl").exists() or not read_metrics(
        tmp_path / "metrics.jsonl"
    )  # stopped before the round was trained on and logged


def test_gap_tolerance_follows_the_dtype_unless_set():
    assert gap_tolerance(load_config(None, [])) == 1e-3
    assert gap_tolerance(load_config(None, ["policy.model.dtype=bfloat16"])) == 5e-2
    cfg = load_config(None, ["rollout.max_logprob_gap=0.2", "policy.model.dtype=bfloat16"])
    assert gap_tolerance(cfg) == 0.2
    check_logprob_gap(0.19, cfg, 0)
    with pytest.raises(UserError, match="round 3: rollout/logprob_gap 0.21"):
        check_logprob_gap(0.21, cfg, 3)
    with pytest.raises(LogprobGapError):
        check_logprob_gap(float("nan"), cfg, 0)
