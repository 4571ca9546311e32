"""What a learner minimises: one small object per kind of training, with no engine, rank or
optimizer in it (those are ``workers.learner.Learner``'s).

An objective gives ``loss(module, batch) -> (loss, stats)``, the loss a MEAN over
``units(batch)`` (tokens, sequences or pairs), and ``units``. The learner weights each
micro-batch's loss by its share of the global minibatch's units, so micro-batches and ranks
add up to the gradient of the loss over the whole minibatch whatever the objective.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from rlhf_ray.algo import (
    aggregate_loss,
    aggregation_weight,
    bradley_terry_loss,
    kl_loss,
    masked_mean,
    policy_loss,
    sft_loss,
    value_loss,
)
from rlhf_ray.models import response_logprobs
from rlhf_ray.types import PairBatch, PPOBatch, SFTBatch

Stats = dict[str, torch.Tensor]


class Objective(Protocol):
    @property
    def name(self) -> str:
        """ "policy", "value", "sft", "reward model": error messages, PPO's stat keys."""
        ...

    def loss(self, module: Any, batch: Any) -> tuple[torch.Tensor, Stats]:
        """The loss of ``batch`` (a mean over its ``units``) and detached stats."""
        ...

    def units(self, batch: Any) -> float:
        """What the loss is a mean over, counted in ``batch``."""
        ...


@dataclass(frozen=True)
class PolicyObjective:
    """PPO's clipped policy loss, an entropy bonus and a KL term (``ppo.*``), under the
    sampler's distribution (``sampling``: temperature, top_k, top_p)."""

    ppo: Any  # config.PPOConfig
    sampling: dict[str, Any] = field(default_factory=dict)
    name: str = "policy"

    def loss(self, module: Any, mb: PPOBatch) -> tuple[torch.Tensor, Stats]:
        ppo = self.ppo
        full: list[torch.Tensor] = []  # unfiltered log-probs: the KL's (models/logprobs.py)
        logprobs, entropy = response_logprobs(
            module,
            mb.input_ids,
            mb.attention_mask,
            mb.prompt_len,
            **self.sampling,
            with_entropy=True,
            entropy_grad=ppo.entropy_coef > 0,
            full=full,
        )
        mask, agg = mb.response_mask, ppo.loss_agg
        loss, stats = policy_loss(
            logprobs, mb.old_logprobs, mb.advantages, mask, ppo.clip_eps, agg, ppo.dual_clip
        )
        assert entropy is not None
        stats["entropy"] = masked_mean(entropy.detach(), mask)
        if ppo.entropy_coef > 0:
            loss = loss - ppo.entropy_coef * aggregate_loss(entropy, mask, agg)
        if ppo.kl_in_loss is not None:
            kl = kl_loss(full[0], mb.ref_logprobs, mask, ppo.kl_in_loss, agg)
            loss = loss + ppo.kl_loss_coef * kl
            stats["kl_loss"] = kl.detach()
        return loss, stats

    def units(self, batch: PPOBatch) -> float:
        return aggregation_weight(batch.response_mask, self.ppo.loss_agg)


def state_values(module: Any, input_ids, attention_mask, prompt_len: int) -> torch.Tensor:
    """Values ``(B, R)``: the value of the state before response token t sits at position
    ``prompt_len - 1 + t`` of the scalar-head model's output."""
    return module(input_ids, attention_mask)[:, prompt_len - 1 : -1]


@dataclass(frozen=True)
class ValueObjective:
    """PPO's clipped value loss, a mean over response tokens."""

    clip_eps: float
    name: str = "value"

    def loss(self, module: Any, mb: PPOBatch) -> tuple[torch.Tensor, Stats]:
        values = state_values(module, mb.input_ids, mb.attention_mask, mb.prompt_len)
        return value_loss(values, mb.old_values, mb.returns, mb.response_mask, self.clip_eps)

    def units(self, batch: PPOBatch) -> float:
        return aggregation_weight(batch.response_mask, "token_mean")


@dataclass(frozen=True)
class SFTObjective:
    """The negative log-likelihood of the reply tokens, a mean over them (``algo.sft_loss``)."""

    name: str = "sft"

    def loss(self, module: Any, batch: SFTBatch) -> tuple[torch.Tensor, Stats]:
        # position t predicts token t + 1: logprobs of tokens 1.. against the mask's tokens 1..
        logprobs, _ = response_logprobs(module, batch.input_ids, batch.attention_mask, 1)
        return sft_loss(logprobs, batch.loss_mask[:, 1:]), {}

    def units(self, batch: SFTBatch) -> float:
        return float(batch.loss_mask[:, 1:].sum())


def pair_scores(module: Any, pairs: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores ``(B,)`` of the chosen and of the rejected sequences (one forward)."""
    ids = torch.cat([pairs.chosen_ids, pairs.rejected_ids])
    mask = torch.cat([pairs.chosen_mask, pairs.rejected_mask])
    scores = module.sequence_scores(ids, mask)
    return scores[: len(pairs)], scores[len(pairs) :]


@dataclass(frozen=True)
class RewardObjective:
    """The Bradley-Terry loss of preference pairs, a mean over pairs."""

    name: str = "reward model"

    def loss(self, module: Any, batch: PairBatch) -> tuple[torch.Tensor, Stats]:
        return bradley_terry_loss(*pair_scores(module, batch))

    def units(self, batch: PairBatch) -> float:
        return float(len(batch))
