"""The workers of ``rlhf-ray eval``, in process: both policies' generators and scorers, and the
reward. ``rlhf_ray.distributed.evaluation.RayEvalWorkers`` runs the same classes as actors.

The generators load their weights from the model directories and are never synced: they hold
version ``LOADED`` (what a ``RolloutGenerator`` holds before any sync).
"""

from __future__ import annotations

import os
from typing import Protocol

import torch

from rlhf_ray.config.stages import EvalConfig, eval_tokenizer
from rlhf_ray.types import PromptBatch, Rollout
from rlhf_ray.workers.interface import round_seed, shard_rows
from rlhf_ray.workers.scorers import ReferenceScorer, RewardScorer
from rlhf_ray.workers.vllm_rollout import generator_class, generator_kwargs

MODELS = ("policy", "baseline")
LOADED = -1
"""Weight version of a generator that holds the weights it loaded from its directory."""


class EvalWorkers(Protocol):
    def generate(self, prompts: PromptBatch, step: int) -> dict[str, Rollout]:
        """Both policies sample every prompt, each row seeded by (eval.seed, step, its prompt
        index) for both; ``{"policy": ..., "baseline": ...}``."""

    def score(self, samples: dict[str, Rollout]) -> dict[str, torch.Tensor]:
        """``policy/scores``, ``baseline/scores`` (B,) from the reward; ``policy/logprobs`` and
        ``baseline/logprobs`` (B, R) of the POLICY's samples under each model."""

    def close(self) -> None:
        """Release every worker."""


class InProcessEvalWorkers:
    """One generator and one log-prob scorer per policy, and the reward scorer, as plain
    objects. Prompts are split into shards as on Ray; rows seed by their index."""

    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg
        tok = eval_tokenizer(cfg)
        specs = {"policy": cfg.policy, "baseline": cfg.baseline}
        self.generators = {
            m: generator_class(cfg.rollout)(specs[m], tok, cfg.rollout, **generator_kwargs(cfg))
            for m in MODELS
        }
        temperature = cfg.rollout.temperature
        self.scorers = {m: ReferenceScorer(specs[m], tok, temperature) for m in MODELS}
        self.reward = RewardScorer(cfg.reward, tok, search_path=[os.getcwd()])

    def generate(self, prompts: PromptBatch, step: int) -> dict[str, Rollout]:
        r = self.cfg.rollout
        parts = shard_rows(len(prompts), r.num_workers, r.micro_batch_size)
        seed = round_seed(self.cfg.eval.seed, step)  # each row seeds by its prompt index
        return {
            m: Rollout.concat([gen.generate(prompts.select(rows), seed, LOADED) for rows in parts])
            for m, gen in self.generators.items()
        }

    def score(self, samples: dict[str, Rollout]) -> dict[str, torch.Tensor]:
        mine = samples["policy"]
        return {
            **{f"{m}/scores": self.reward.score(samples[m]) for m in MODELS},
            **{f"{m}/logprobs": self.scorers[m].logprobs(mine) for m in MODELS},
        }

    def close(self) -> None:
        self.generators.clear()
        self.scorers.clear()
