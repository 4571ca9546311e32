"""A LoRA policy and critic through run_ppo in one process: only the adapters move (base frozen,
adapters synced alone, the rollout workers sample the learner's distribution), the reference can
be the policy's own base, a replayed round reproduces its losses, a resumed run ends with the
uninterrupted run's adapters exactly, and a LoRA critic started from the reward model exports
the model it computed with."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from rlhf_ray.config.ppo import ModelSpec, load_config
from rlhf_ray.data.tokenization import build_tokenizer
from rlhf_ray.models import build_causal_lm, build_scalar_model
from rlhf_ray.models.build import preset_config
from rlhf_ray.models.memory import ModelShape, role_memory
from rlhf_ray.observe.metrics import read_metrics
from rlhf_ray.ppo.loop import run_ppo
from rlhf_ray.ppo.replay import replay_round
from rlhf_ray.workers.inprocess import InProcessWorkers
from tests.helpers.model_dirs import save_reward_model

SMALL = [
    "rollout.batch_size=4",
    "ppo.minibatch_size=4",
    "policy.engine=torch",
    "policy.num_ranks=1",
    "value.engine=torch",
    "value.num_ranks=1",
    "policy.lora.r=4",
    "checkpoint.every=1",
]


TOK = build_tokenizer(load_config().tokenizer)


def adapter(run_dir, role: str = "policy") -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / role / "adapter" / "adapter_model.safetensors"))


def test_lora_run_syncs_adapters_only_replays_and_resumes_exactly(tmp_path):
    cfg = load_config(
        None, [*SMALL, "value.lora.r=4", "train.rounds=2", "logging.dump_rollouts_every=1"]
    )
    workers = InProcessWorkers(cfg)
    base = {k: v.clone() for k, v in workers.policy.module.get_base_model().state_dict().items()
            if ".lora_" not in k}  # fmt: skip
    run_ppo(cfg, workers, tmp_path / "full")
    rows = read_metrics(tmp_path / "full" / "metrics.jsonl")
    assert all(r["sync/bytes"] * 10 <= r["sync/full_bytes"] for r in rows)
    assert all(r["sync/logprob_max_abs_diff"] <= 1e-5 for r in rows)
    assert all(r["rollout/logprob_gap"] <= 1e-5 for r in rows)  # workers sample the learner's
    after = workers.policy.module.get_base_model().state_dict()
    assert all(torch.equal(base[k], after[k]) for k in base)  # the base never moved
    trained = adapter(tmp_path / "full")
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in trained.items())
    # a checkpoint holds the adapters and their optimizer state, not the base
    state = load_file(str(tmp_path / "full/checkpoints/round_000001/policy_state/torch_engine.safetensors"))  # fmt: skip
    weights = [k for k in state if k.startswith("module.")]
    assert weights and all(".lora_" in k for k in weights)
    assert not (tmp_path / "full/checkpoints/round_000001/policy/model.safetensors").exists()

    # `rlhf-ray replay` restores the adapters' state and reproduces round 1's update
    replayed = replay_round(tmp_path / "full", 1)
    for key in ("ppo/policy_loss", "ppo/value_loss"):
        assert abs(replayed.replayed[key] - rows[1][key]) <= 1e-6, key

    short = load_config(None, [*SMALL, "value.lora.r=4", "train.rounds=1"])
    run_ppo(short, InProcessWorkers(short), tmp_path / "cut")
    run_ppo(cfg, InProcessWorkers(cfg), tmp_path / "cut", resume=True)
    for role in ("policy", "value"):  # the critic's adapters and head resume exactly too
        resumed, trained = adapter(tmp_path / "cut", role), adapter(tmp_path / "full", role)
        assert max((resumed[k] - trained[k]).abs().max().item() for k in trained) == 0.0


def test_a_lora_critic_from_the_reward_model_exports_what_it_computed(tmp_path):
    rm = save_reward_model(tmp_path / "rm", TOK)
    cfg = load_config(None, [*SMALL, "train.rounds=1", "value.lora.r=4", f"reward.model.path={rm}",
                             "value.init_from_reward=true"])  # fmt: skip
    workers = InProcessWorkers(cfg)
    run_ppo(cfg, workers, tmp_path / "run")
    saved = adapter(tmp_path / "run", "value")
    assert all(".lora_" in k or ".score." in k for k in saved)  # adapters and the whole head
    config = json.loads((tmp_path / "run/value/adapter/adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(rm)  # the critic's base: the reward model
    ids = torch.tensor([[5, 72, 101, 108, 108, 111, 32, 119]])
    mask = torch.ones_like(ids)
    merged = build_scalar_model(ModelSpec(path=str(tmp_path / "run/value")), TOK)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids, mask), workers.value.module(ids, mask))
        assert not torch.allclose(
            merged(ids, mask), build_scalar_model(ModelSpec(path=str(rm)), TOK)(ids, mask)
        )


def test_reference_from_policy_base_scores_with_adapters_off(tmp_path):
    cfg = load_config(None, [*SMALL, "train.rounds=2", "reference.from_policy_base=true"])
    workers = InProcessWorkers(cfg)
    assert workers.reference is None  # no second model
    run_ppo(cfg, workers, tmp_path)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[0]["ppo/kl"] == pytest.approx(0.0, abs=1e-6)  # fresh adapters: policy == base
    assert rows[1]["ppo/kl"] != pytest.approx(0.0, abs=1e-6)
    # after training, the reference log-probs are still the base model's
    from rlhf_ray.models import response_logprobs

    ids = torch.tensor([[5, 72, 101, 108, 108, 111, 32, 119]])
    mask = torch.ones_like(ids)
    base = build_causal_lm(cfg.policy.model, workers.policy.tokenizer)
    expected = response_logprobs(base, ids, mask, 3)[0]
    with torch.no_grad(), workers.policy.module.disable_adapter():
        got = response_logprobs(workers.policy.module, ids, mask, 3)[0]
    assert torch.allclose(got, expected, atol=1e-6)


def test_lora_parameter_count_by_hand():
    # GPT-2, hidden 4, MLP 16, one layer, r=2: c_attn 4->12: 2*16; attn c_proj 4->4: 2*8;
    # mlp c_proj 16->4: 2*20; c_fc 4->16: 2*20  => 32 + 16 + 40 + 40 = 128
    shape = ModelShape.from_config(
        {
            "model_type": "gpt2",
            "vocab_size": 10,
            "n_embd": 4,
            "n_layer": 1,
            "n_head": 1,
            "n_inner": 16,
            "n_positions": 8,
        }  # fmt: skip
    )
    assert shape.lora_params(2, None) == 128
    assert shape.lora_params(2, ["c_attn"]) == 32


@pytest.mark.parametrize(("engine", "nbytes"), [("deepspeed", 12), ("auto", 8)])
def test_plan_counts_a_lora_critics_adapters_and_head_as_what_trains(engine, nbytes):
    cfg = load_config(
        None,
        ["value.lora.r=2", "value.num_ranks=1", "value.zero_stage=2", f"value.engine={engine}"],
    )
    estimate = role_memory(cfg)["value"]
    assert not isinstance(estimate, str) and "LoRA r=2" in estimate.source
    shape = ModelShape.from_config(preset_config(cfg.value.model, TOK).to_dict())
    trainable = shape.lora_params(2, None) + shape.hidden  # the adapters and the score head
    # per trained parameter: AdamW's two fp32 moments (8 bytes: auto trains one float32 rank
    # with torch AdamW), plus DeepSpeed's fp32 master copy (12 bytes)
    assert estimate.parts["optimizer"] == nbytes * trainable
