"""Checks of everything cheap, on the driver, before any actor starts.

Starting a cluster's actors can take many minutes; a typo in a data path should not cost them.
Each check raises a ``UserError`` whose message names the setting, the file, the line and the
field, so the CLI prints one paragraph and exits non-zero within seconds. ``preflight_ppo`` runs
them all for ``rlhf-ray ppo``; other stages call the pieces they need (``check_model``,
``check_tokenizer``, ``check_prompts``, ``check_reward``, ``check_remote_rewards``,
``check_resume``; ``rlhf-ray eval``: ``check_eval_models``). Tokenizers are checked as resolved: an unset (``auto``) tokenizer is the
one saved in the policy's model directory, and a reward model may bring its own.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhf_ray.config.ppo import (
    Config,
    ModelSpec,
    RewardConfig,
    TokenizerConfig,
    has_critic,
    model_tokenizer,
    policy_tokenizer,
    reward_tokenizer,
)
from rlhf_ray.config.roles import is_adapter_dir, reward_models
from rlhf_ray.config.stages import EvalConfig, eval_tokenizer
from rlhf_ray.data.tokenization import Tokenizer, build_tokenizer, same_tokenizer
from rlhf_ray.errors import UserError
from rlhf_ray.ppo.checkpoint import check_resumable, expected_parts, is_complete


def _looks_local(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or os.path.exists(path) or path.count("/") > 1


def check_model(setting: str, spec: ModelSpec | None) -> None:
    """A model ``path`` is a directory with a ``config.json`` (or, if it is shaped like a Hub id
    and no such directory exists, a Hub model the loader can resolve)."""
    if spec is None or spec.path is None:
        return  # a preset: built from its config, nothing to find
    if is_adapter_dir(spec.path):  # a PEFT adapter: its base must be a model
        from rlhf_ray.models.lora import adapter_base

        base = adapter_base(spec)
        check_model(f"{setting}.path's base ({base})", spec.model_copy(update={"path": base}))
        return
    path = os.path.expanduser(spec.path)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UserError(
                f"{setting}.path {spec.path}: the directory has no config.json, so it is not a "
                "Hugging Face model directory (save one with save_pretrained)"
            )
        return
    if _looks_local(path):
        raise UserError(f"{setting}.path {spec.path}: no such model directory")
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(path)
    except Exception as exc:  # offline, unknown id, ...: many types
        raise UserError(
            f"{setting}.path {spec.path!r} is not a local directory, and loading it as a "
            f"Hugging Face Hub model failed ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None


def check_tokenizer(tokenizer: TokenizerConfig) -> Tokenizer:
    """The tokenizer builds (its file or directory exists and loads)."""
    try:
        return build_tokenizer(tokenizer)
    except Exception as exc:  # tiktoken, tokenizers and transformers raise many types
        raise UserError(
            f"tokenizer ({tokenizer.kind} {tokenizer.name_or_path!r}) could not be built: "
            f"{type(exc).__name__}: {str(exc)[:300]}"
        ) from None


def check_reward(
    reward: RewardConfig, search_path: Sequence[str], column_names: Sequence[str] | None = None
) -> None:
    """``reward.function`` and every term's function import and can be called as
    ``fn(prompts, responses, <columns>)``, asking only for columns the prompt set has (when
    ``column_names`` is given); a ``reward.model`` path exists."""
    members = reward_models(reward)
    for i, spec in enumerate(members):
        check_model(f"reward.model[{i}]" if len(members) > 1 else "reward.model", spec)
    for term in reward.terms:
        check_model(f"reward.terms[{term.name}].model", term.model)
    functions = [("reward.function", reward.function, {})]
    functions += [(f"reward.terms[{t.name}].function", t.function, t.kwargs) for t in reward.terms]
    for setting, name, kwargs in functions:
        if name is not None:
            _check_function(setting, name, search_path, column_names, kwargs)


def _check_function(
    setting: str,
    name: str,
    search_path: Sequence[str],
    column_names: Sequence[str] | None,
    kwargs: dict | None = None,
) -> None:
    from rlhf_ray.rewards.functions import column_parameters, load_reward_function, missing_columns
    from rlhf_ray.rewards.terms import bind_kwargs

    try:
        fn = bind_kwargs(load_reward_function(name, search_path), kwargs or {}, setting)
    except ValueError as exc:
        raise UserError(str(exc).replace("reward.function", setting, 1)) from None
    except Exception as exc:  # the module itself fails to import (SyntaxError, NameError ...)
        raise UserError(
            f"{setting} {name!r}: importing its module failed: {type(exc).__name__}: {exc}"
        ) from None
    required = column_parameters(fn)[0]
    try:
        inspect.signature(fn).bind(["prompt"], ["response"], **{c: [None] for c in required})
    except TypeError as exc:
        raise UserError(
            f"{setting} {name!r} cannot be called as fn(prompts, responses): {exc}"
        ) from None
    except ValueError:  # no signature (a builtin): it will be called as is
        pass
    missing = missing_columns(fn, column_names) if column_names is not None else []
    if missing:
        raise UserError(
            f"{setting} {name!r} asks for the column(s) {missing}, which the prompt set "
            f"(data.prompts) does not have; its columns: {sorted(column_names or []) or 'none'}"
        )


def check_remote_rewards(
    reward: RewardConfig, columns: Sequence[dict[str, Any]] | None = None
) -> None:
    """Every prompt row's columns can be sent as JSON, and every reward service
    (``reward.remote``, remote terms) answers one probe request (with the first row's columns)
    with scores: an unreachable URL or a refused token fails here, naming the URL and status."""
    from rlhf_ray.rewards.remote import check_metadata, probe, remote_configs

    for setting, remote in remote_configs(reward):
        check_metadata(columns or [], setting)
        probe(remote, columns[0] if columns else None, setting)


def check_prompts(cfg: Config, tokenizer: Tokenizer) -> int:
    """The prompt data is readable, non-empty, decodable and has its field; returns the number
    of prompts. Bad rows fail here naming file and line (or are counted, ``on_bad_row: skip``)."""
    from rlhf_ray.ppo.batches import build_prompts

    try:
        return len(build_prompts(cfg, tokenizer))
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise UserError(f"data.prompts: {exc}") from None


def _prompt_columns(cfg: Config, tokenizer: Tokenizer) -> list[dict[str, Any]]:
    from rlhf_ray.ppo.batches import build_prompts

    return build_prompts(cfg, tokenizer).columns


def check_resume(cfg: Config, run_dir: Path, in_process: bool = False) -> None:
    """The checkpoint ``--resume`` would continue from is complete and ``cfg`` may resume it
    on this placement (``in_process``: one rank per group, which decides an auto engine)."""
    found = sorted((run_dir / "checkpoints").glob("round_*"))
    if not found:
        return  # the run starts over from round 0
    newest = found[-1]
    if not is_complete(newest):
        missing = [p for p in expected_parts(newest) if not (newest / p).exists()]
        raise UserError(
            f"cannot resume: checkpoint {newest} is incomplete (missing {', '.join(missing)}); "
            "it was not written by a finished save. Remove it to resume from an older one."
        )
    for role in ("policy", "value")[: 1 + has_critic(cfg)]:
        group = getattr(cfg, role)
        engine = group.engine_for(1 if in_process else group.num_ranks, group.model.dtype)
        state = newest / f"{role}_state"
        needed = ["torch_engine.safetensors", "torch_engine.json"] if engine == "torch" else []
        if engine == "deepspeed" and not any(state.iterdir()):
            needed = ["DeepSpeed state"]
        missing = [n for n in needed if not (state / n).exists()]
        if missing:
            raise UserError(
                f"cannot resume: {state} lacks {', '.join(missing)} for {role}.engine "
                f"{engine!r} (a checkpoint of another engine or version)"
            )
    check_resumable(newest, cfg)


def preflight_ppo(
    cfg: Config,
    run_dir: Path | None,
    resume: bool,
    search_path: Sequence[str],
    in_process: bool = False,
):
    """Every check of a PPO run, cheapest first; raises the first ``UserError``."""
    for setting, spec in (
        ("policy.model", cfg.policy.model),
        ("value.model", cfg.value.model),
        ("reference.model", cfg.reference.model),
    ):
        if setting != "value.model" or has_critic(cfg):  # no critic: value.* is unused
            check_model(setting, spec)
    tokenizer = check_tokenizer(policy_tokenizer(cfg))
    readers = [("policy.model", cfg.policy.model), ("reference.model", cfg.reference.model)]
    if has_critic(cfg):
        readers.append(("value.model", cfg.value.model))
    check_sequence_length(cfg.data, cfg.rollout, readers)
    check_rollout_backend(cfg.rollout, "policy.model", cfg.policy.model)
    check_reward(cfg.reward, search_path)
    check_model_tokenizers(cfg)
    check_prompts(cfg, tokenizer)
    columns = _prompt_columns(cfg, tokenizer)
    check_reward(cfg.reward, search_path, sorted(columns[0]) if columns else [])
    check_remote_rewards(cfg.reward, columns)
    if resume and run_dir is not None:
        check_resume(cfg, run_dir, in_process)


def model_positions(spec: ModelSpec) -> int | None:
    """How many positions the model of ``spec`` covers (None: unbounded or unknown here)."""
    if spec.path is None:
        return spec.max_positions
    from transformers import AutoConfig

    from rlhf_ray.models.build import max_positions

    try:
        config = AutoConfig.from_pretrained(os.path.expanduser(spec.path))
    except Exception:  # check_model has named what is wrong with the path
        return None
    return max_positions(config, default=0) or None


def check_sequence_length(data: Any, rollout: Any, models: list[tuple[str, Any]]) -> None:
    """A round's sequences (``data.max_prompt_tokens`` + ``rollout.max_new_tokens`` tokens)
    fit each of ``models`` (``(setting, ModelSpec or None)``) that reads them. Else the first
    forward past a model's positions fails on an actor (HF) or vLLM refuses the requests."""
    need = data.max_prompt_tokens + rollout.max_new_tokens
    for setting, spec in models:
        positions = None if spec is None else model_positions(spec)
        if positions is not None and need > positions:
            raise UserError(
                f"{setting} covers {positions} positions, but a round's sequences take up to "
                f"{need} tokens (data.max_prompt_tokens {data.max_prompt_tokens} + "
                f"rollout.max_new_tokens {rollout.max_new_tokens}): lower one of them"
                + (f", or raise {setting}.max_positions" if spec and spec.path is None else "")
            )


def check_rollout_backend(rollout: Any, setting: str, spec: ModelSpec) -> None:
    """``rollout.backend`` vllm: vLLM is installed (else the error names the extra) and can
    load the model's architecture."""
    if rollout.backend == "vllm":
        from rlhf_ray.engines.vllm_engine import check_backend

        check_backend(setting, spec, on_gpu=rollout.num_gpus_per_worker > 0)


def check_data_file(setting: str, path: str, split: str, skip_bad_rows: bool) -> None:
    """A data source opens, is not empty and (JSON lines) every line is a UTF-8 JSON object,
    unless bad rows are to be skipped."""
    from rlhf_ray.data.sources import load_table

    try:
        load_table(path, split=split, skip_bad_lines=skip_bad_rows)
    except (ValueError, OSError) as exc:
        raise UserError(f"{setting}: {exc}") from None


def preflight_stage(cfg: Any) -> None:
    """The checks of ``rlhf-ray sft`` / ``train-rm`` (a ``stage_config`` config): the model and
    tokenizer paths, and the data files."""
    check_model("model", cfg.model)
    if cfg.tokenizer is not None:
        check_tokenizer(cfg.tokenizer)
    data = cfg.data
    check_data_file("data.path", data.path, data.split, data.skip_bad_rows)
    if data.eval_path is not None:
        check_data_file("data.eval_path", data.eval_path, data.split, data.skip_bad_rows)


def load_tokenizer(tok: TokenizerConfig, what: str) -> Tokenizer:
    """``build_tokenizer`` with its failure turned into a ``UserError`` naming ``what``."""
    try:
        return build_tokenizer(tok)
    except ValueError as exc:
        raise UserError(f"{what}: {exc}") from None


def check_model_tokenizers(cfg: Config) -> None:
    """The policy's and the reward model's tokenizers load, and a critic initialised from the
    reward model (``value.init_from_reward``) reads the policy's token ids."""
    policy_tok_cfg = policy_tokenizer(cfg)
    policy_tok = load_tokenizer(policy_tok_cfg, "the policy's tokenizer")
    if cfg.reward.model is None:
        return
    specs = reward_models(cfg.reward) + [t.model for t in cfg.reward.terms if t.model]
    reward_toks = [
        load_tokenizer(reward_tokenizer(cfg.reward, policy_tok_cfg, s), f"{s.path}'s tokenizer")
        for s in specs
    ]
    reward_tok = reward_toks[0]
    if cfg.value.init_from_reward and not same_tokenizer(policy_tok, reward_tok):
        raise UserError(
            f"value.init_from_reward: the reward model {cfg.reward.model.path} has a tokenizer "
            "other than the policy's, and the critic reads the policy's token ids; start the "
            "critic from its own value.model, or use a reward model trained on the policy's "
            "tokenizer"
        )


def check_eval_models(cfg: EvalConfig) -> None:
    """Both policies read the same token ids (the KL compares them token by token), and the
    reward's tokenizer loads."""
    tok_cfg = eval_tokenizer(cfg)
    tok = load_tokenizer(tok_cfg, "the policy's tokenizer")
    check_rollout_backend(cfg.rollout, "policy.path", cfg.policy)
    check_rollout_backend(cfg.rollout, "baseline.path", cfg.baseline)
    check_sequence_length(
        cfg.data, cfg.rollout, [("policy", cfg.policy), ("baseline", cfg.baseline)]
    )
    own = model_tokenizer(cfg.baseline.path)
    if own is not None and cfg.tokenizer.kind == "auto":
        baseline_tok = load_tokenizer(own, "the baseline's tokenizer")
        if not same_tokenizer(tok, baseline_tok):
            raise UserError(
                f"the baseline {cfg.baseline.path} has a tokenizer other than the policy's "
                f"({tok_cfg.name_or_path or tok_cfg.kind}); eval compares the two token by "
                "token: give both the same tokenizer"
            )
    for spec in reward_models(cfg.reward) + [t.model for t in cfg.reward.terms if t.model]:
        load_tokenizer(reward_tokenizer(cfg.reward, tok_cfg, spec), "the reward model's tokenizer")
