"""The reward of a rollout from its parts: the main score (a reward model, a function or a
remote service) plus the weighted ``reward.terms``.

``RewardParts.score`` returns ``scores`` (B,): ``main + sum(weight * term)``, and for the
metrics ``reward_term/main`` and ``reward_term/<name>`` (B,) (each part's own score, before its
weight) and, when a part is remote, ``reward_remote/latency_s`` and ``reward_remote/retries``
(1,) per scorer replica. A function or a service gets each sample's prompt-row columns. A model
part (the main reward model or ensemble, a term's ``model``) is scored by the caller's
``model_scores``; an ensemble adds ``reward_member/<i>`` (B,) and ``reward_ensemble/std`` (B,).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from rlhf_ray.errors import UserError
from rlhf_ray.rewards.functions import RewardFn, call_reward_function, load_reward_function
from rlhf_ray.rewards.remote import RemoteOptions, RemoteReward, RemoteStats
from rlhf_ray.types import Rollout

# A part: the rollout's scores (B,), for a remote part its request stats, and extra per-sample
# figures (an ensemble's members) to report beside them.
Part = Callable[[Rollout], tuple[torch.Tensor, RemoteStats | None, dict[str, torch.Tensor]]]
# What scores a model part: ``scores`` (B,) and any extra figures.
ModelScores = Callable[[Rollout], dict[str, torch.Tensor]]


class RewardTermError(UserError, RuntimeError):
    """A reward term failed; the message names it."""


def bind_kwargs(fn: RewardFn, kwargs: dict[str, Any], setting: str) -> RewardFn:
    """``fn`` with the fixed keyword arguments ``kwargs`` (a term's ``kwargs``): a parameter
    bound so is left out of the signature, so it is never read from a prompt-set column."""
    if not kwargs:
        return fn
    signature = inspect.signature(fn)
    params = signature.parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(k for k in kwargs if k not in params or list(params).index(k) < 2)
    if unknown and not takes_all:
        raise ValueError(
            f"{setting}.kwargs: {unknown} are not keyword parameters of the function "
            f"(it takes {list(params)[2:]})"
        )

    def bound(*args: Any, **columns: Any) -> Any:
        return fn(*args, **columns, **kwargs)

    kept = [p for p in params.values() if p.name not in kwargs]
    bound.__signature__ = signature.replace(parameters=kept)  # type: ignore[attr-defined]
    return bound


def function_part(
    name: str, search_path: list[str], kwargs: dict[str, Any] | None = None, setting: str = ""
) -> Part:
    fn = bind_kwargs(load_reward_function(name, search_path), kwargs or {}, setting)

    def part(rollout: Rollout) -> tuple[torch.Tensor, RemoteStats | None, dict]:
        scores = call_reward_function(fn, name, rollout.prompts, rollout.responses, rollout.columns)
        return torch.tensor(scores, dtype=torch.float32), None, {}

    return part


def remote_part(cfg: Any, setting: str, options: RemoteOptions | None = None) -> Part:
    client = RemoteReward(cfg, setting, options)

    def part(rollout: Rollout) -> tuple[torch.Tensor, RemoteStats | None, dict]:
        scores, stats = client.score(rollout.prompts, rollout.responses, rollout.columns)
        return torch.tensor(scores, dtype=torch.float32), stats, {}

    return part


def model_part(model_scores: ModelScores) -> Part:
    def part(rollout: Rollout) -> tuple[torch.Tensor, RemoteStats | None, dict]:
        out = dict(model_scores(rollout))
        return out.pop("scores").float().cpu(), None, out

    return part


class RewardParts:
    """The main part of ``reward_cfg`` (``model_scores`` for a reward model or an ensemble)
    and its terms (``term_models[name]`` for a term's ``model``)."""

    def __init__(
        self,
        reward_cfg: Any,
        search_path: list[str],
        model_scores: ModelScores | None = None,
        term_models: dict[str, ModelScores] | None = None,
        remote: RemoteOptions | None = None,
    ):
        if reward_cfg.remote is not None:
            self.main = remote_part(reward_cfg.remote, "reward.remote", remote)
        elif reward_cfg.function is not None:
            self.main = function_part(reward_cfg.function, search_path)
        else:
            assert model_scores is not None, "a reward model needs model_scores"
            self.main = model_part(model_scores)
        self.terms: list[tuple[str, float, Part]] = []
        for term in reward_cfg.terms:
            setting = f"reward.terms[{term.name}]"
            if term.function is not None:
                part = function_part(term.function, search_path, term.kwargs, setting)
            elif term.remote is not None:
                part = remote_part(term.remote, setting + ".remote", remote)
            else:
                assert term_models is not None, "a term's reward model needs term_models"
                part = model_part(term_models[term.name])
            self.terms.append((term.name, term.weight, part))

    def score(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        main, stats, extras = self.main(rollout)
        out = {"scores": main.clone(), "reward_term/main": main, **extras}
        remote = [stats] if stats is not None else []
        for name, weight, part in self.terms:
            try:
                value, stats, _ = part(rollout)
            except Exception as exc:
                raise RewardTermError(f"reward term {name!r} failed: {exc}") from exc
            out[f"reward_term/{name}"] = value
            out["scores"] = out["scores"] + weight * value
            remote += [stats] if stats is not None else []
        if remote:
            latency = sum(s.latency_s for s in remote) / len(remote)
            out["reward_remote/latency_s"] = torch.tensor([latency])
            out["reward_remote/retries"] = torch.tensor([float(sum(s.retries for s in remote))])
        return out


def reward_metrics(scored: dict[str, torch.Tensor]) -> dict[str, float]:
    """``reward/<part>_mean`` of each part, an ensemble's ``reward/member<i>_mean`` and
    ``reward/ensemble_std``, ``reward/remote_latency_s`` (mean over replicas) and
    ``reward/remote_retries`` (their sum) from the scored round."""
    out = {}
    for key, value in scored.items():
        if key.startswith("reward_term/"):
            out[f"reward/{key.removeprefix('reward_term/')}_mean"] = float(value.float().mean())
        elif key.startswith("reward_member/"):  # an ensemble member's (standardised) scores
            out[f"reward/member{key.removeprefix('reward_member/')}_mean"] = float(value.mean())
    if "reward_ensemble/std" in scored:  # the members' disagreement, per sample, averaged
        out["reward/ensemble_std"] = float(scored["reward_ensemble/std"].mean())
    if "reward_remote/latency_s" in scored:
        out["reward/remote_latency_s"] = float(scored["reward_remote/latency_s"].mean())
        out["reward/remote_retries"] = int(scored["reward_remote/retries"].sum())
    return out
