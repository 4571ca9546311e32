"""The scorer actors of a PPO run: the reference and reward replicas (``reference-<i>``,
``reward-<i>``), how one is started and called, and what it needs of a node. Frozen models
with pure calls, so Ray may restart one and retry its call (``SCORER_RESTARTS``)."""

from __future__ import annotations

import os
from typing import Any

from rlhf_ray.config.ppo import Config, policy_tokenizer
from rlhf_ray.distributed.actors import spawn_actor
from rlhf_ray.rewards.remote import driver_options
from rlhf_ray.workers.scorers import ReferenceScorer, RewardScorer

SCORER_RESTARTS = 3  # restarts Ray makes of a scorer itself (max_restarts), each counted


def score_call(scorer: Any, name: str, rows_ref: Any) -> Any:
    """A scorer replica's call on its rows: the reference's log-probs or the reward's scores
    (``scores`` and its parts, ``RewardScorer.score_parts``)."""
    if name.startswith("reference-"):
        return scorer.logprobs.remote(rows_ref)
    return scorer.score_parts.remote(rows_ref)


def scorer_needs(cfg: Config, name: str) -> dict[str, float]:
    """The resources of the scorer replica ``name``."""
    role = cfg.reference if name.startswith("reference-") else cfg.reward
    return {"CPU": role.num_cpus, "GPU": role.num_gpus}


def spawn_scorer(cfg: Config, name: str, strategy: Any) -> Any:
    """The scorer replica ``name`` (``reference-<i>`` or ``reward-<i>``), placed by
    ``strategy``."""
    tok = policy_tokenizer(cfg)
    if name.startswith("reference-"):
        ref = cfg.reference
        return spawn_actor(
            ReferenceScorer,
            name,
            ref.num_cpus,
            ref.num_gpus,
            ref.model or cfg.policy.model,
            tok,
            cfg.rollout.temperature,
            chunk_size=ref.score_micro_batch_size,
            restarts=SCORER_RESTARTS,
            strategy=strategy,
        )
    rew = cfg.reward
    return spawn_actor(
        RewardScorer,
        name,
        rew.num_cpus,
        rew.num_gpus,
        rew,
        tok,
        search_path=[os.getcwd()],
        chunk_size=rew.score_micro_batch_size,
        remote=driver_options(rew, cfg.train.phase_timeout_s),  # tokens: never runtime_env
        restarts=SCORER_RESTARTS,
        strategy=strategy,
    )
