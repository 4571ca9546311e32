"""Stage configs (sft, train-rm): embedded defaults, overrides, one-paragraph errors."""

from __future__ import annotations

import pytest
from test_config import _undescribed

from rlhf_ray.config.ppo import ConfigError, LearnerConfig, PolicyConfig, TokenizerConfig, to_yaml
from rlhf_ray.config.stages import (
    RewardModelConfig,
    SFTConfig,
    load_rm_config,
    load_sft_config,
    stage_tokenizer,
)


@pytest.mark.parametrize("load,schema", [(load_sft_config, SFTConfig),
                                         (load_rm_config, RewardModelConfig)])  # fmt: skip
def test_defaults_round_trip_and_every_setting_is_described(tmp_path, load, schema):
    cfg = load()
    assert cfg == schema() and cfg.data.path == "builtin:hh-rlhf"
    path = tmp_path / "c.yaml"
    path.write_text(to_yaml(cfg))
    assert load(path, ["train.epochs=5", "model.path=/m"]).train.epochs == 5
    assert _undescribed(schema, "", set()) == []


@pytest.mark.parametrize(
    "overrides,names",
    [
        (["data.eval_path=x.jsonl"], ["eval_path", "eval_fraction"]),
        (["train.batch_size=15"], ["train.batch_size", "learner.num_ranks"]),
        (["learner.engine=torch"], ["learner", "one rank"]),
        (["data.max_prompt_tokens=500"], ["max_prompt_tokens", "max_tokens"]),
        (["data.format=messages"], ["data.format"]),  # not a preference format
        (["train.epoch=2"], ["train.epoch", "not a known setting"]),
    ],
)
def test_bad_settings_fail_in_one_paragraph(overrides, names):
    with pytest.raises(ConfigError) as info:
        load_rm_config(None, overrides)
    msg = str(info.value)
    assert "\n" not in msg and all(n in msg for n in names), msg


def test_the_learner_section_is_the_one_ppo_roles_use():
    """A stage's `learner` is the learner-group section of PPO's `policy` (no copy of its
    fields), so a stage takes gradient checkpointing, parameter offload and micro-batches."""
    cfg = load_sft_config(None, ["learner.num_ranks=1", "learner.zero_stage=3",
                                 "learner.offload_params=true", "learner.gradient_checkpointing=true",
                                 "train.batch_size=8", "train.micro_batch_size=2"])  # fmt: skip
    assert type(cfg.learner) is LearnerConfig and issubclass(PolicyConfig, LearnerConfig)
    assert (cfg.learner.offload_params, cfg.learner.gradient_checkpointing) == (True, True)
    assert cfg.train.micro_batch_size == 2
    with pytest.raises(ConfigError, match="train.micro_batch_size"):
        load_sft_config(None, ["learner.num_ranks=2", "train.batch_size=8",
                               "train.micro_batch_size=3"])  # fmt: skip
    with pytest.raises(ConfigError, match="offload_params"):
        load_sft_config(None, ["learner.offload_params=true", "learner.zero_stage=2"])


def test_tokenizer_comes_from_the_model_dir_unless_set(tmp_path):
    assert stage_tokenizer(SFTConfig()) == TokenizerConfig(kind="bytes")
    (tmp_path / "tokenizer.json").write_text("{}")
    cfg = load_rm_config(None, [f"model.path={tmp_path}"])
    assert stage_tokenizer(cfg) == TokenizerConfig(kind="hf", name_or_path=str(tmp_path))
    cfg = load_rm_config(None, [f"model.path={tmp_path}", "tokenizer.kind=bytes"])
    assert stage_tokenizer(cfg) == TokenizerConfig(kind="bytes")
