"""SFTLearner and RewardLearner: the learner ranks of ``rlhf-ray sft`` and ``train-rm``.

Both are the PPO learners' ``LearnerRank`` (same engines, process group, weight gathering and
Hugging Face saving) with a stage loss. Every rank holds the whole tokenized train and eval sets
(``load_data``, once). Step ``s`` of epoch ``e`` trains on rows ``perm_e[s*B : (s+1)*B]`` of a
permutation seeded by (seed, epoch), identical on every rank; each rank takes its contiguous
share and scales its loss so that the rank-averaged gradient is the gradient of the mean over
the global minibatch (a token mean for SFT, a pair mean for the RM), as ``LearnerRank.run_epochs``
does for PPO; reported step stats are weighted the same way. So 1 rank and N ranks take the
same steps and report the same figures (up to float rounding). A last partial
batch of an epoch is dropped.

Evaluation: every rank scores the whole split (identical forwards keep ZeRO-3's parameter
gathers in step; the splits are small) and rank 0's figures are reported.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from rlhf_ray.algo import bradley_terry_loss, sft_loss
from rlhf_ray.models import build_causal_lm, build_scalar_model, response_logprobs
from rlhf_ray.tokenization import build_tokenizer
from rlhf_ray.types import PairBatch, Rows, SFTBatch
from rlhf_ray.workers.learners import LearnerRank


class _StageRank(LearnerRank):
    """What both stage learners share: the data, the rows of a step, one step, evaluation."""

    def __init__(
        self,
        role_cfg,
        build: Callable[[], torch.nn.Module],
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        num_threads: int | None,
    ):
        super().__init__(
            role_cfg,
            None,
            build,
            rank,
            world_size,
            seed,
            num_threads,
            micro_batch=batch_size // world_size,
        )
        self.batch_size = batch_size
        self.data: dict[str, Any] = {}

    def loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The stage loss of ``batch`` (a mean over its ``units``) and detached stats."""
        raise NotImplementedError

    def units(self, batch: Any) -> float:
        """What the loss is a mean over, counted in ``batch`` (tokens, pairs)."""
        raise NotImplementedError

    def load_data(self, train: Rows, eval_set: Rows | None = None) -> int:
        self.data = {"train": train} if eval_set is None else {"train": train, "eval": eval_set}
        return len(train)

    def step_rows(self, epoch: int, step: int) -> torch.Tensor:
        """The global rows of one step (identical on every rank)."""
        gen = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        perm = torch.randperm(len(self.data["train"]), generator=gen)
        return perm[step * self.batch_size : (step + 1) * self.batch_size]

    def train_step(self, epoch: int, step: int) -> dict[str, float]:
        """One optimizer step on this rank's share of the step's rows. Returns this rank's
        loss and stats weighted so that their mean over ranks is the global minibatch's."""
        assert self.engine is not None, "call setup() first"
        rows = self.step_rows(epoch, step)
        mb = self.data["train"].select(rows[self.my_rows(len(rows))]).to(self.device)
        loss, stats = self.loss(mb)
        weight = self.units(mb) * self.world_size / self.units(self.data["train"].select(rows))
        # a non-finite loss (on any rank) or gradient skips the step everywhere, as in PPO
        applied = self._finite_everywhere(loss)
        if applied:
            self.engine.backward(loss * weight)
            applied = bool(self.engine.step())  # one micro-batch per step: always a boundary
        if applied:
            self.bad_in_row = 0
        else:
            self._bad_step(epoch)
        out = {k: float(v) * weight for k, v in {"loss": loss.detach(), **stats}.items()}
        return {**out, "skipped_steps": 0.0 if applied else 1.0}

    def save(self, directory: str) -> None:
        """Collective; rank 0 writes the model in Hugging Face format (no progress bar)."""
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        super().save(directory)

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, float]:
        """The loss and stats over the whole ``split`` ("train" or "eval"), unit-weighted."""
        data = self.data[split]
        sums: dict[str, float] = defaultdict(float)
        count = 0.0
        for start in range(0, len(data), self.micro_batch):
            part = data.select(slice(start, start + self.micro_batch)).to(self.device)
            loss, stats = self.loss(part)
            weight = self.units(part)
            for k, v in {"loss": loss, **stats}.items():
                sums[k] += float(v) * weight
            count += weight
        return {k: v / count for k, v in sums.items()}


class SFTLearner(_StageRank):
    """A causal LM trained on reply tokens (``algo.sft_loss``), one data-parallel rank."""

    def __init__(
        self,
        learner_cfg,
        tokenizer_cfg,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_threads: int | None = None,
    ):
        tok = build_tokenizer(tokenizer_cfg)
        super().__init__(
            learner_cfg,
            lambda: build_causal_lm(learner_cfg.model, tok),
            batch_size,
            rank,
            world_size,
            seed,
            num_threads,
        )

    def loss(self, batch: SFTBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # position t predicts token t + 1: logprobs of tokens 1.. against the mask's tokens 1..
        logprobs, _ = response_logprobs(self.module, batch.input_ids, batch.attention_mask, 1)
        return sft_loss(logprobs, batch.loss_mask[:, 1:]), {}

    def units(self, batch: SFTBatch) -> float:
        return float(batch.loss_mask[:, 1:].sum())


class RewardLearner(_StageRank):
    """A scalar-head model trained with the Bradley-Terry loss, one data-parallel rank."""

    def __init__(
        self,
        learner_cfg,
        tokenizer_cfg,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_threads: int | None = None,
    ):
        tok = build_tokenizer(tokenizer_cfg)
        super().__init__(
            learner_cfg,
            lambda: build_scalar_model(learner_cfg.model, tok),
            batch_size,
            rank,
            world_size,
            seed,
            num_threads,
        )

    def pair_scores(self, pairs: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores ``(B,)`` of the chosen and of the rejected sequences (one forward)."""
        ids = torch.cat([pairs.chosen_ids, pairs.rejected_ids])
        mask = torch.cat([pairs.chosen_mask, pairs.rejected_mask])
        scores = self.module.sequence_scores(ids, mask)
        return scores[: len(pairs)], scores[len(pairs) :]

    def loss(self, batch: PairBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return bradley_terry_loss(*self.pair_scores(batch))

    def units(self, batch: PairBatch) -> float:
        return float(len(batch))

    @torch.no_grad()
    def scores(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Chosen and rejected scores ``(N,)`` of every pair of ``split``, on the CPU."""
        data = self.data[split]
        parts = [
            self.pair_scores(data.select(slice(i, i + self.micro_batch)).to(self.device))
            for i in range(0, len(data), self.micro_batch)
        ]
        return torch.cat([c for c, _ in parts]).cpu(), torch.cat([r for _, r in parts]).cpu()


@dataclass(frozen=True)
class StageRole:
    """How to build a stage's learner ranks: ``cls(role_cfg, **kwargs, rank=, world_size=)``."""

    name: str  # actor names are ``{name}-{rank}``
    cls: type[_StageRank]
    role_cfg: Any  # config.PolicyConfig (see stage_config.learner_role)
    kwargs: dict[str, Any]
