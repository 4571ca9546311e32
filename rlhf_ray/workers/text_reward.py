"""TextRewardScorer: the reward of ``(prompts, responses, metadata)`` given as text, what
``rlhf-ray serve-reward`` serves (``rlhf_ray.distributed.reward_service``).

A reward model reads the texts as the PPO reward scorer reads a rollout's text in the model's
own tokenizer (``RewardScorer.encode_text``: prompt + response, then the model's EOS: every
served response counts as finished), through the same code, so a served score is the
in-process one. A function gets the metadata fields as columns.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from rlhf_ray.config.ppo import ModelSpec, RewardConfig, TokenizerConfig, resolve_tokenizer
from rlhf_ray.data.tokenization import build_tokenizer, left_pad
from rlhf_ray.rewards.functions import (
    call_reward_function,
    column_parameters,
    load_reward_function,
)
from rlhf_ray.rewards.shaping import STAT_KEYS
from rlhf_ray.types import Rollout
from rlhf_ray.workers.scorers import RewardScorer
from rlhf_ray.workers.threads import set_threads


def text_rollout(tokenizer, prompts: list[str], responses: list[str], max_len: int) -> Rollout:
    """A rollout of given texts: left-padded prompt ids, right-padded response ids, no EOS
    sampled (the reward scorer appends the model's EOS)."""
    prompt_ids, prompt_mask = left_pad(
        [tokenizer.encode(p) for p in prompts], tokenizer.pad_id, max_len
    )
    rows = [tokenizer.encode(r)[:max_len] or [tokenizer.pad_id] for r in responses]
    width = max(len(r) for r in rows)
    response_ids = torch.full((len(rows), width), tokenizer.pad_id, dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        response_ids[i, : len(row)] = torch.tensor(row)
        response_mask[i, : len(row)] = 1 if responses[i] else 0
    n = len(rows)
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        prompt_index=torch.arange(n),
        response_ids=response_ids,
        response_mask=response_mask,
        has_eos=torch.zeros(n, dtype=torch.bool),
        sampler_logprobs=torch.zeros(response_ids.shape),
        weight_version=torch.zeros(n, dtype=torch.long),
        prompts=list(prompts),
        responses=list(responses),
    )


class TextRewardScorer:
    """Scores texts with a reward model directory or a ``module:callable`` function."""

    def __init__(
        self,
        reward_model: str | None = None,
        function: str | None = None,
        search_path: list[str] | None = None,
        num_threads: int | None = None,
    ):
        if (reward_model is None) == (function is None):
            raise ValueError("give exactly one of a reward model directory and a function")
        set_threads(num_threads)
        self.function = function
        self.reward_model = reward_model
        if function is not None:
            self.fn = load_reward_function(function, search_path or [])
            return
        reward = RewardConfig(function=None, model=ModelSpec(path=reward_model))
        tok_cfg = resolve_tokenizer(TokenizerConfig(), reward_model)
        self.scorer = RewardScorer(reward, tok_cfg)
        self.tokenizer = build_tokenizer(tok_cfg)
        # texts from anywhere: read as text in the model's tokenizer (RewardScorer.encode_text)
        self.scorer.text_tokenizer = self.tokenizer

    def required_columns(self) -> list[str]:
        """The metadata columns every request must carry (a function's required parameters)."""
        return column_parameters(self.fn)[0] if self.function is not None else []

    def shaping_info(self) -> dict[str, Any]:
        """What shaping these scores expect, as an in-process ``reward.normalize: auto`` would
        resolve it (``running`` for a model, ``none`` for a function), and the model's
        train-set score statistics (``rlhf-ray train-rm`` stores them; null if absent)."""
        stats: dict[str, Any] = {}
        if self.reward_model is not None:
            with open(os.path.join(self.reward_model, "config.json")) as f:
                stats = json.load(f)
        mean, std = (stats.get(key) for key in STAT_KEYS)
        source = "function" if self.function is not None else "model"
        normalize = "none" if self.function is not None else "running"
        return {"source": source, "normalize": normalize, "score_mean": mean, "score_std": std}

    def score(
        self,
        prompts: list[str],
        responses: list[str],
        metadata: list[dict[str, Any]] | None = None,
    ) -> list[float]:
        if self.function is not None:
            columns = metadata if metadata is not None else [{} for _ in responses]
            return call_reward_function(self.fn, self.function, prompts, responses, columns)
        # RewardScorer keeps the last tokens of prompt + response + EOS that fit its positions
        rollout = text_rollout(self.tokenizer, prompts, responses, self.scorer.max_length)
        return [float(s) for s in self.scorer.score(rollout)]
