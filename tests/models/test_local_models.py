"""The real loading paths, offline: a run whose policy, critic and tokenizer come from local
Hugging Face directories, and one scored by a reward model that also initialises the critic."""

from __future__ import annotations

import math

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_ray.config.ppo import ModelSpec, TokenizerConfig, load_config
from rlhf_ray.data.tokenization import build_tokenizer
from rlhf_ray.models import build_causal_lm, build_scalar_model
from rlhf_ray.observe.metrics import read_metrics
from rlhf_ray.ppo.loop import run_ppo
from rlhf_ray.workers.inprocess import InProcessWorkers

FAST = ["policy.engine=torch", "policy.num_ranks=1", "value.engine=torch", "train.rounds=2",
        "rollout.batch_size=8", "ppo.minibatch_size=8", "logging.progress=false"]  # fmt: skip


def _hf_dir(tmp_path, name: str, scalar: bool = False):
    """A llama-tiny model (causal LM or one-label classifier) and its tokenizer, saved."""
    tok = build_tokenizer(TokenizerConfig())
    spec = ModelSpec(preset="llama-tiny", init_seed=3)
    model = build_scalar_model(spec, tok) if scalar else build_causal_lm(spec, tok)
    path = tmp_path / name
    model.save_pretrained(str(path))
    tok.save(path)
    return path


def test_run_from_local_hf_model_and_tokenizer(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = _hf_dir(tmp_path, "base")
    cfg = load_config(None, [*FAST, "tokenizer.kind=hf", f"tokenizer.name_or_path={base}",
                             f"policy.model.path={base}", f"value.model.path={base}"])  # fmt: skip
    run_ppo(cfg, InProcessWorkers(cfg), tmp_path / "run")
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 2 and all(math.isfinite(r["ppo/kl"]) for r in rows)
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "policy")
    assert policy.config.model_type == "llama"
    tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "policy")
    assert tok.pad_token_id != tok.eos_token_id


def test_reward_model_scores_and_initialises_the_critic(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rm = _hf_dir(tmp_path, "rm", scalar=True)
    cfg = load_config(None, [*FAST, "reward.function=null", f"reward.model.path={rm}",
                             "value.init_from_reward=true"])  # fmt: skip
    workers = InProcessWorkers(cfg)
    reward_model = build_scalar_model(ModelSpec(path=str(rm)), build_tokenizer(cfg.tokenizer))
    critic = workers.value.module.state_dict()
    for name, value in reward_model.state_dict().items():
        assert torch.equal(critic[name], value), name
    run_ppo(cfg, workers, tmp_path / "run")
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all(math.isfinite(r["rollout/reward_mean"]) for r in rows)
    assert rows[0]["rollout/reward_std"] > 0  # scores depend on the response, not a constant
