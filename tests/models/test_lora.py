"""LoRA models: which modules get adapters, what trains, adapter directories as a start (checked
key for key) and the export (adapter + merged model) that loads anywhere."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from rlhf_ray.config.ppo import LoraSpec, ModelSpec, TokenizerConfig, load_config
from rlhf_ray.data.tokenization import build_tokenizer
from rlhf_ray.engines.training import make_adamw
from rlhf_ray.engines.vllm_lora import lora_rank_slot, peft_file_tensors
from rlhf_ray.models import build_causal_lm, build_scalar_model, response_logprobs
from rlhf_ray.models.build import build_policy_lm
from rlhf_ray.models.lora import (
    AdapterMismatchError,
    adapter_tensors,
    export_lora,
    is_lora,
    merged_weights,
    tied_modules_to_save,
)
from tests.helpers.model_dirs import save_policy, save_reward_model

TOK = build_tokenizer(TokenizerConfig())
IDS = torch.tensor([[5, 72, 101, 108, 108, 111, 32, 119, 111, 114]])
MASK = torch.ones_like(IDS)


def logprobs(model) -> torch.Tensor:
    with torch.no_grad():
        return response_logprobs(model, IDS, MASK, 3)[0]


def trained(model) -> None:
    """Move every adapter away from its start (B = 0 would make the adapters do nothing)."""
    with torch.no_grad():
        for p in adapter_tensors(model).values():
            p.add_(torch.randn_like(p) * 0.05)


@pytest.mark.parametrize(
    ("preset", "targets"),
    [
        ("gpt2-tiny", {"c_attn", "c_proj", "c_fc"}),
        (
            "llama-tiny",
            {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
        ),
    ],
)
def test_default_targets_are_attention_and_mlp_and_only_adapters_train(preset, targets):
    model = build_policy_lm(ModelSpec(preset=preset), LoraSpec(r=4), TOK)
    trainable = adapter_tensors(model)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert adapted == targets
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # the optimizer holds state for the adapters alone
    optim = make_adamw(model, load_config().policy.optim)
    held = sum(p.numel() for g in optim.param_groups for p in g["params"])
    assert held == sum(p.numel() for p in trainable.values())
    assert held < sum(p.numel() for p in model.parameters()) / 5
    # fresh adapters (B = 0) leave the function of the base unchanged
    base = build_causal_lm(ModelSpec(preset=preset), TOK)
    assert torch.equal(logprobs(model), logprobs(base))


def test_from_policy_base_needs_a_lora_policy():
    with pytest.raises(Exception, match="from_policy_base needs a LoRA policy"):
        load_config(None, ["reference.from_policy_base=true"])
    cfg = load_config(None, ["reference.from_policy_base=true", "policy.lora.r=8"])
    assert cfg.policy.lora is not None and cfg.policy.lora.r == 8


@pytest.fixture
def adapter_dir(tmp_path):
    """A base model directory and a trained adapter on it (saved by peft)."""
    base = save_policy(tmp_path / "base", TOK)
    model = build_policy_lm(ModelSpec(path=str(base)), LoraSpec(r=4), TOK)
    trained(model)
    model.save_pretrained(str(tmp_path / "adapter"))
    return tmp_path / "adapter", model


def test_an_adapter_dir_starts_a_run_trained_further_or_merged(adapter_dir):
    path, original = adapter_dir
    spec = ModelSpec(path=str(path))  # its base: the adapter's base_model_name_or_path
    further = build_policy_lm(spec, None, TOK)
    assert adapter_tensors(further)  # trained further: adapters, on the right base
    assert torch.allclose(logprobs(further), logprobs(original), atol=1e-6)
    merged = build_causal_lm(spec, TOK)  # a frozen role, or merge_adapter=true
    assert not any(".lora_" in n for n, _ in merged.named_parameters())
    assert torch.allclose(logprobs(merged), logprobs(original), atol=1e-5)
    # a changed shape is refused by name, not trained as another adapter
    with pytest.raises(Exception, match="lora.r 8 differs"):
        build_policy_lm(spec, LoraSpec(r=8), TOK)


def test_an_adapter_whose_keys_do_not_match_is_refused(adapter_dir):
    path, _ = adapter_dir
    weights = load_file(str(path / "adapter_model.safetensors"))
    # StrictBot's mistake: the keys of another wrapping of the model (an extra prefix)
    save_file({f"base.{k}": v for k, v in weights.items()}, str(path / "adapter_model.safetensors"))
    with pytest.raises(AdapterMismatchError, match="refused rather than loaded partially"):
        build_policy_lm(ModelSpec(path=str(path)), None, TOK)
    with pytest.raises(AdapterMismatchError):
        build_causal_lm(ModelSpec(path=str(path), merge_adapter=True), TOK)


def test_export_writes_an_adapter_and_a_merged_model_with_the_same_logprobs(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = save_policy(tmp_path / "base", TOK)
    spec = ModelSpec(path=str(base_dir))
    model = build_policy_lm(spec, LoraSpec(r=4), TOK)
    trained(model)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    export_lora(model, state, str(tmp_path / "out"), spec, merged=True)
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    before = logprobs(base)
    adapter = PeftModel.from_pretrained(base, str(tmp_path / "out" / "adapter"))
    assert (logprobs(merged) - logprobs(adapter)).abs().max() < 1e-5
    assert (logprobs(adapter) - logprobs(model)).abs().max() < 1e-6
    assert not torch.allclose(logprobs(merged), before, atol=1e-3)  # it did train


@pytest.mark.parametrize(("preset", "to_save"), [("gpt2-tiny", ["ln_f"]), ("llama-tiny", None)])
def test_merged_weights_are_the_peft_models_function_under_plain_names(preset, to_save):
    # what a vLLM worker reloads when vLLM cannot serve the adapters (GPT-2)
    model = build_policy_lm(ModelSpec(preset=preset), LoraSpec(r=4, modules_to_save=to_save), TOK)
    trained(model)
    plain = build_causal_lm(ModelSpec(preset=preset, init_seed=5), TOK)
    plain.load_state_dict(merged_weights(model), strict=True)  # every name, no adapter name
    assert torch.allclose(logprobs(plain), logprobs(model), atol=1e-5)
    base = build_causal_lm(ModelSpec(preset=preset), TOK)
    assert not torch.allclose(logprobs(plain), logprobs(base))  # the adapters are in it
    assert tied_modules_to_save(model) == []
    tied = build_policy_lm(ModelSpec(), LoraSpec(r=4, modules_to_save=["lm_head"]), TOK)
    assert tied_modules_to_save(tied) == ["lm_head"]  # GPT-2's head is tied to wte


def test_vllm_takes_a_lora_policy_with_peft_file_names_and_a_rank_slot():
    cfg = load_config(None, ["rollout.backend=vllm", "policy.lora.r=4"])
    assert cfg.policy.lora is not None and cfg.rollout.backend == "vllm"
    sent = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight": IDS}
    assert list(peft_file_tensors(sent)) == [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    ]
    assert [lora_rank_slot(r) for r in (1, 4, 16, 17, 512, 513)] == [1, 8, 16, 32, 512, None]


def test_a_scalar_adapter_dir_is_trained_further_or_merged_with_its_head(tmp_path):
    """A value/reward model's exported adapter (adapters + the score head) starts a scalar
    model again: trained further (LoRA, the head still whole) or merged, scoring the same."""
    spec = ModelSpec(path=str(save_reward_model(tmp_path / "rm", TOK)))
    model = build_scalar_model(spec, TOK, lora=LoraSpec(r=4))
    trained(model)
    export_lora(model, model.state_dict(), str(tmp_path / "out"), spec, merged=False)
    adapter = ModelSpec(path=str(tmp_path / "out" / "adapter"))
    further = build_scalar_model(adapter, TOK)
    merged = build_scalar_model(adapter.model_copy(update={"merge_adapter": True}), TOK)
    assert any(".score.modules_to_save." in n for n in adapter_tensors(further))
    assert not is_lora(merged)
    with torch.no_grad():
        expected = model(IDS, MASK)
        torch.testing.assert_close(further(IDS, MASK), expected)
        torch.testing.assert_close(merged(IDS, MASK), expected, atol=1e-5, rtol=0)
