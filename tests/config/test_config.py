"""The typed config: embedded default, YAML files, dotted overrides and one-paragraph errors."""

from __future__ import annotations

import types
import typing

import pydantic
import pytest
import yaml

from rlhf_ray.config.ppo import Config, ConfigError, load_config, parse_overrides, to_yaml

# Settings that scripts, docs and the CLI rely on: each must exist and take an override.
CONTRACT = {
    "train.rounds": 3,
    "train.seed": 7,
    "rollout.batch_size": 8,
    "rollout.num_workers": 3,
    "rollout.max_new_tokens": 5,
    "reward.function": "my_rewards:score",
    "policy.num_ranks": 1,
    "policy.zero_stage": 3,
    "policy.num_gpus_per_rank": 1.0,
    "checkpoint.every": 4,
    "data.prompts": "prompts.jsonl",
}


def _get(cfg: Config, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _error(path=None, overrides=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_embedded_default_round_trips_through_yaml_file(tmp_path):
    cfg = load_config()
    assert cfg == Config()
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


def test_non_default_config_round_trips_through_yaml_file(tmp_path):
    cfg = load_config(
        None,
        [
            "cluster.nodes=[{cpus: 8, gpus: 2, count: 2}]",
            "policy.optim.betas=[0.8, 0.9]",
            "reward.function=null",
            "reward.model.path=/models/rm",
            "reward.clip=3.5",
        ],
    )
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


def test_yaml_file_is_read_and_overrides_win(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  rounds: 5\n  seed: 3\nrollout:\n  batch_size: 64\n")
    cfg = load_config(path, ["train.seed=11"])
    assert cfg.train.rounds == 5  # from the file
    assert cfg.train.seed == 11  # override beats the file
    assert cfg.rollout.batch_size == 64
    assert cfg.rollout.num_workers == Config().rollout.num_workers  # untouched default


def test_override_values_are_parsed_as_yaml_scalars():
    cfg = load_config(
        None,
        [
            "train.rounds=7",  # int
            "policy.optim.lr=0.0005",  # float
            "policy.optim.weight_decay=1e-2",  # float written in e-notation
            "logging.progress=false",  # bool
            "reward.clip=null",  # null
            "reward.missing_eos_penalty=1.5",  # float
            "train.seed=-3",  # negative int
            "policy.model.hidden_size=32",  # nested three levels deep
        ],
    )
    assert cfg.train.rounds == 7
    assert cfg.policy.optim.lr == pytest.approx(5e-4)
    assert cfg.policy.optim.weight_decay == pytest.approx(1e-2)
    assert cfg.logging.progress is False
    assert cfg.reward.clip is None
    assert cfg.reward.missing_eos_penalty == 1.5
    assert cfg.train.seed == -3
    assert cfg.policy.model.hidden_size == 32


def test_override_can_set_a_whole_list():
    cfg = load_config(None, ["cluster.nodes=[{cpus: 4}, {cpus: 8, gpus: 1, count: 2}]"])
    assert [(n.cpus, n.gpus, n.count) for n in cfg.cluster.nodes] == [(4, 0, 1), (8, 1, 2)]


def test_parse_overrides_builds_a_nested_tree():
    assert parse_overrides(["a.b=1", "a.c=x", "d=true", "e=", "f=k=v"]) == {
        "a": {"b": 1, "c": "x"},
        "d": True,
        "e": "",
        "f": "k=v",
    }


@pytest.mark.parametrize("name, value", sorted(CONTRACT.items()))
def test_contract_settings_exist_and_are_overridable(name, value):
    overrides = [f"{name}={value}"]
    if name == "rollout.batch_size":
        overrides.append("ppo.minibatch_size=4")
    cfg = load_config(None, overrides)
    assert _get(cfg, name) == value
    assert _get(Config(), name) != value  # the override changed something


def test_unknown_key_names_the_key():
    msg = _error(None, ["rollout.bach_size=4"])
    assert "rollout.bach_size" in msg
    assert "not a known setting" in msg


def test_unknown_key_in_yaml_file_names_the_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("ppo:\n  cliprange: 0.1\n")
    msg = _error(path)
    assert "ppo.cliprange" in msg
    assert str(path) in msg


def test_wrong_type_names_the_field_and_value():
    msg = _error(None, ["rollout.batch_size=many"])
    assert "rollout.batch_size" in msg
    assert "'many'" in msg


def test_out_of_range_value_names_the_field():
    msg = _error(None, ["policy.zero_stage=5"])
    assert "policy.zero_stage" in msg


def test_minibatch_must_divide_batch():
    msg = _error(None, ["rollout.batch_size=24", "ppo.minibatch_size=16"])
    assert "ppo.minibatch_size" in msg
    assert "rollout.batch_size" in msg


def test_minibatch_must_be_divisible_by_num_ranks():
    msg = _error(None, ["rollout.batch_size=9", "ppo.minibatch_size=3", "policy.num_ranks=2"])
    assert "ppo.minibatch_size" in msg
    assert "policy.num_ranks" in msg


def test_minibatch_must_be_divisible_by_value_ranks():
    msg = _error(
        None,
        [
            "policy.num_ranks=1",
            "value.num_ranks=4",
            "ppo.minibatch_size=6",
            "rollout.batch_size=12",
        ],
    )
    assert "value.num_ranks" in msg


def test_reward_model_replaces_the_default_function():
    cfg = load_config(None, ["reward.model.path=/models/rm"])
    assert cfg.reward.function is None and cfg.reward.model.path == "/models/rm"
    assert load_config().reward.function == "rlhf_ray.rewards:lowercase_fraction"


def test_reward_function_and_model_are_exclusive():
    msg = _error(None, ["reward.model.path=/models/rm", "reward.function=my.mod:fn"])
    assert "`reward`" in msg
    assert "function" in msg and "model" in msg and "function=null" in msg
    assert "set exactly one" in _error(None, ["reward.function=null"])


def test_reward_model_alone_is_accepted():
    cfg = load_config(None, ["reward.function=null", "reward.model.path=/models/rm"])
    assert cfg.reward.function is None
    assert cfg.reward.model.path == "/models/rm"


def test_reward_function_without_colon_is_rejected():
    msg = _error(None, ["reward.function=mymodule.score"])
    assert "reward.function" in msg or "`reward`" in msg
    assert "mymodule.score" in msg


@pytest.mark.parametrize("item", ["rollout.batch_size", "=3", "a..b=1", "rollout.=2"])
def test_bad_override_syntax_quotes_the_override(item):
    msg = _error(None, [item])
    assert repr(item) in msg


def test_conflicting_overrides_are_rejected():
    msg = _error(None, ["policy=1", "policy.num_ranks=2"])
    assert "policy" in msg


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.yaml"
    msg = _error(path)
    assert str(path) in msg


def test_invalid_yaml_names_the_path(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train: [1, 2\n")
    assert str(path) in _error(path)


def test_non_mapping_yaml_names_the_path(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- train\n- rollout\n")
    msg = _error(path)
    assert str(path) in msg
    assert "mapping" in msg


def test_error_message_is_one_paragraph():
    msg = _error(None, ["rollout.batch_size=x", "nosuch=1"])
    assert "\n" not in msg
    assert "rollout.batch_size" in msg and "nosuch" in msg  # every problem, in one message


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        load_config(None, ["nosuch=1"])


def test_config_is_frozen():
    cfg = load_config()
    with pytest.raises(pydantic.ValidationError):
        cfg.train.rounds = 99  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        cfg.train = cfg.train  # type: ignore[misc]
    assert cfg.train.rounds == Config().train.rounds


def _sections(annotation) -> list[type[pydantic.BaseModel]]:
    """The pydantic models inside a field annotation (``X``, ``X | None``, ``list[X]``)."""
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return [annotation]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is not None:
        return [m for arg in typing.get_args(annotation) for m in _sections(arg)]
    return []


def _undescribed(model: type[pydantic.BaseModel], prefix: str, seen: set) -> list[str]:
    missing = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        if not (field.description or "").strip():
            missing.append(dotted)
        for sub in _sections(field.annotation):
            if (sub, dotted) not in seen:
                seen.add((sub, dotted))
                missing += _undescribed(sub, f"{dotted}.", seen)
    return missing


def test_every_setting_has_a_description():
    seen: set = set()
    assert _undescribed(Config, "", seen) == []
    # The walk reached the nested sections (including optional and list ones).
    walked = {name for _, name in seen}
    assert {"policy.model", "reward.model", "reference.model", "cluster.nodes"} <= walked


def test_to_yaml_is_plain_yaml_of_every_section():
    data = yaml.safe_load(to_yaml(Config()))
    assert set(data) == set(Config.model_fields)
    assert data["policy"]["optim"]["betas"] == [0.9, 0.999]


def test_float16_policy_needs_gpus():
    msg = _error(None, ["policy.model.dtype=float16"])
    assert "policy.model.dtype" in msg
    cfg = load_config(None, ["policy.model.dtype=float16", "policy.num_gpus_per_rank=1"])
    assert cfg.policy.model.dtype == "float16"


def test_float16_value_on_its_own_gpus_is_accepted():
    cfg = load_config(None, ["value.model.dtype=float16", "value.num_gpus_per_rank=1"])
    assert cfg.value.model.dtype == "float16"


def test_float16_value_on_cpu_is_rejected_even_if_the_policy_has_gpus():
    msg = _error(None, ["value.model.dtype=float16", "policy.num_gpus_per_rank=1"])
    assert "value.model.dtype" in msg


def test_ranks_of_one_group_cannot_share_a_gpu():
    msg = _error(None, ["policy.num_gpus_per_rank=0.5"])  # 2 ranks by default
    assert "policy" in msg and "num_gpus_per_rank" in msg
    assert load_config(None, ["policy.num_gpus_per_rank=0.5", "policy.num_ranks=1"])


def test_a_rank_drives_one_gpu_at_most():
    msg = _error(None, ["value.num_gpus_per_rank=2"])
    assert "value" in msg and "num_gpus_per_rank 2 > 1" in msg and "num_ranks" in msg


# -- estimators and group sampling ---------------------------------------------------------------

GRPO = ["algo.estimator=grpo", "rollout.samples_per_prompt=4"]


def test_minibatch_divides_the_samples_of_a_round_not_the_prompts():
    # 6 prompts x 4 samples = 24 rows: a minibatch of 8 fits though 8 does not divide 6
    cfg = load_config(None, [*GRPO, "rollout.batch_size=6", "ppo.minibatch_size=8"])
    assert (cfg.rollout.batch_size, cfg.rollout.samples_per_prompt) == (6, 4)
    msg = _error(None, [*GRPO, "rollout.batch_size=6", "ppo.minibatch_size=16"])
    assert "rollout.samples_per_prompt" in msg and "ppo.minibatch_size (16)" in msg


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_group_estimators_need_two_samples_per_prompt(estimator):
    msg = _error(None, [f"algo.estimator={estimator}"])
    assert "rollout.samples_per_prompt" in msg and estimator in msg


def test_reinforce_pp_and_gae_accept_one_sample_per_prompt():
    assert load_config(None, ["algo.estimator=reinforce_pp"]).rollout.samples_per_prompt == 1
    assert load_config(None, ["rollout.samples_per_prompt=2"]).algo.estimator == "gae"


def test_kl_in_both_reward_and_loss_is_refused():
    msg = _error(None, [*GRPO, "ppo.kl_in_loss=k3", "ppo.kl_coef=0.05"])
    assert "ppo.kl_in_loss" in msg and "ppo.kl_coef" in msg and "twice" in msg
    cfg = load_config(None, [*GRPO, "ppo.kl_in_loss=k2", "ppo.kl_coef=0"])
    assert cfg.ppo.kl_in_loss == "k2"
    assert "ppo.kl_in_loss" in _error(None, ["ppo.kl_in_loss=k1", "ppo.kl_coef=0"])


def test_critic_free_runs_ignore_the_value_group_settings():
    # value.num_ranks 3 would not divide minibatch 8, but there is no value group to split
    cfg = load_config(None, [*GRPO, "value.num_ranks=3", "ppo.minibatch_size=8"])
    assert cfg.value.num_ranks == 3
    assert "value.num_ranks" in _error(None, ["value.num_ranks=3", "ppo.minibatch_size=8"])


def test_loss_aggregation_choices():
    assert load_config().ppo.loss_agg == "token_mean"
    assert (
        load_config(None, ["ppo.loss_agg=seq_mean_token_sum"]).ppo.loss_agg == "seq_mean_token_sum"
    )
    assert "ppo.loss_agg" in _error(None, ["ppo.loss_agg=token_sum"])


def test_the_sync_threshold_follows_the_dtype_unless_set():
    cfg = load_config(None, [])
    assert cfg.sync.tolerance("float32") == 0.01  # exact agreement on CPU: tight
    assert cfg.sync.tolerance("bfloat16") > cfg.sync.tolerance("float16") > 0.01
    assert load_config(None, ["sync.max_logprob_diff=0.5"]).sync.tolerance("float32") == 0.5


def test_zero_buckets_follow_the_device_unless_set():
    from rlhf_ray.engines.training import deepspeed_config

    cfg = load_config(None, ["policy.zero_buckets.reduce=123456"])
    gpu, cpu = cfg.policy.zero_buckets.resolve(True), cfg.policy.zero_buckets.resolve(False)
    assert gpu["reduce"] == cpu["reduce"] == 123456
    assert gpu["prefetch"] == 50_000_000 and cpu["prefetch"] == 10_000_000
    zero = deepspeed_config(3, 1, 2, 1.0, "bfloat16", False, buckets=gpu)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 123456
    assert zero["stage3_max_live_parameters"] == zero["sub_group_size"] == 1_000_000_000


def test_the_docs_state_the_bf16_sync_tolerance_the_code_uses():
    """Every "bfloat16 X" / "X for bfloat16" tolerance in design.md and the README is
    ``SYNC_TOLERANCE["bfloat16"]``."""
    import re
    from pathlib import Path

    from rlhf_ray.config.ppo import SYNC_TOLERANCE

    root = Path(__file__).resolve().parents[2]
    stated = []
    for doc in ("docs/design.md", "README.md"):
        text = " ".join((root / doc).read_text().split())
        stated += re.findall(r"bfloat16 (\d[\d.e-]*\d)", text)
        stated += re.findall(r"(\d[\d.e-]*\d) (?:is kept )?for bfloat16", text)
    assert stated and {float(x) for x in stated} == {SYNC_TOLERANCE["bfloat16"]}, stated


def test_sync_transport_keeps_the_object_store_by_default_and_auto_picks_by_devices_and_hosts():
    from rlhf_ray.config.ppo import sync_backend, sync_transport

    gpus = ["policy.num_gpus_per_rank=1", "rollout.num_gpus_per_worker=1"]
    assert sync_transport(load_config(None, [])) == "object_store"
    auto = load_config(None, ["sync.transport=auto"])  # CPUs: the shared slot on one host
    assert (sync_transport(auto), sync_transport(auto, hosts=2)) == ("collective", "object_store")
    no_slot = load_config(None, ["sync.transport=auto", "sync.shared_memory=false"])
    assert sync_transport(no_slot) == "object_store"
    assert sync_transport(load_config(None, ["sync.transport=auto", *gpus])) == "collective"
    assert (
        sync_transport(load_config(None, ["sync.transport=auto", *gpus]), hosts=4) == "collective"
    )
    half = ["sync.transport=auto", "policy.num_gpus_per_rank=1"]  # workers on CPUs
    assert sync_transport(load_config(None, half), hosts=2) == "object_store"
    cpu = load_config(None, ["sync.transport=collective"])
    assert (sync_transport(cpu), sync_backend(cpu)) == ("collective", "gloo")
    assert sync_backend(load_config(None, ["sync.transport=collective", *gpus])) == "nccl"
    # a fraction of a GPU may share one with another member: NCCL refuses that group
    shared = [
        "policy.num_ranks=1",
        "policy.num_gpus_per_rank=0.5",
        "rollout.num_gpus_per_worker=0.25",
    ]
    assert sync_backend(load_config(None, ["sync.transport=collective", *shared])) == "gloo"
    assert sync_transport(load_config(None, ["sync.transport=auto", *shared]), 2) == "object_store"
    with pytest.raises(ConfigError, match="sync.transport"):
        load_config(None, ["sync.transport=nccl"])


@pytest.mark.parametrize(
    "overrides,ranks,engine",
    [
        ([], 1, "torch"),  # one float32 rank (in process, or num_ranks 1): plain AdamW
        ([], 2, "deepspeed"),  # ZeRO over ranks
        (["policy.model.dtype=bfloat16"], 1, "deepspeed"),  # fp32 master weights
        (["policy.offload_optimizer=true"], 1, "deepspeed"),
        (["policy.zero_stage=3"], 1, "deepspeed"),  # ZeRO-3's partitioned loading asked for
        (["policy.engine=deepspeed"], 1, "deepspeed"),  # an explicit engine is kept
        (["policy.engine=torch", "policy.num_ranks=1"], 1, "torch"),
    ],
)
def test_auto_engine_is_torch_on_one_float32_rank_and_deepspeed_otherwise(overrides, ranks, engine):
    policy = load_config(None, overrides).policy
    assert policy.engine_for(ranks, policy.model.dtype) == engine


def test_auto_engine_allows_zero3_parameter_offload():
    policy = load_config(None, ["policy.zero_stage=3", "policy.offload_params=true"]).policy
    assert policy.engine == "auto" and policy.engine_for(1, "float32") == "deepspeed"
