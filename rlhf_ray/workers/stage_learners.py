"""The learner ranks of ``rlhf-ray sft`` and ``train-rm``: the one ``workers.learner.Learner``
(the same engines, minibatch step, process group and Hugging Face saving as PPO's learners) on
the SFT or Bradley-Terry objective. Every rank holds the whole tokenized train and eval sets
(``Learner.load_data``, once); step ``s`` of epoch ``e`` trains on rows
``perm_e[s*B : (s+1)*B]`` of a permutation seeded by (seed, epoch), identical on every rank.

An SFT rank is a plain ``Learner``; ``RewardLearner`` is a subclass only because Ray calls
methods on an actor's class and the reward-model stage reads each pair's scores
(``scores``) for its final statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rlhf_ray.data.tokenization import build_tokenizer
from rlhf_ray.models import build_scalar_model
from rlhf_ray.models.build import build_policy_lm
from rlhf_ray.workers.learner import Learner
from rlhf_ray.workers.objectives import pair_scores


@dataclass(frozen=True)
class ModelBuilder:
    """Builds a stage's model in the learner's process (sent to Ray actors as an argument):
    a causal LM (SFT) or a scalar-head model (reward model) from ``spec``."""

    kind: str  # "causal_lm" or "scalar"
    spec: Any  # config.ModelSpec
    tokenizer: Any  # config.TokenizerConfig
    lora: Any = None  # the learner's `lora` section (adapters, saved as <output>/adapter)

    def __call__(self) -> torch.nn.Module:
        tok = build_tokenizer(self.tokenizer)
        if self.kind == "causal_lm":
            return build_policy_lm(self.spec, self.lora, tok)
        return build_scalar_model(self.spec, tok, lora=self.lora)


class RewardLearner(Learner):
    """A scalar-head model trained with the Bradley-Terry loss, one data-parallel rank."""

    @torch.no_grad()
    def scores(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Chosen and rejected scores ``(N,)`` of every pair of ``split``, on the CPU."""
        data: Any = self.data[split]  # a PairBatch
        size = self.score_batch
        parts = [
            pair_scores(self.module, data.select(slice(i, i + size)).to(self.device))
            for i in range(0, len(data), size)
        ]
        return torch.cat([c for c, _ in parts]).cpu(), torch.cat([r for _, r in parts]).cpu()


@dataclass(frozen=True)
class StageRole:
    """How to build a stage's learner ranks: ``cls(role_cfg, **kwargs, rank=, world_size=)``."""

    name: str  # actor names are ``{name}-{rank}``
    cls: type[Learner]
    role_cfg: Any  # config.LearnerConfig: the stage's `learner` section
    kwargs: dict[str, Any]
