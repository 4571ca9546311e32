"""PPO's learner ranks: the policy and the critic, each a ``workers.learner.Learner`` on its
``workers.objectives`` objective (see ``Learner`` for how rows, ranks and micro-batches add up).

``PolicyLearner`` and ``ValueLearner`` are subclasses for one reason: Ray calls methods on an
actor's class, and these two answer reads that only their role makes (the policy's old
log-probs, greedy continuation and sync probe; the critic's values). Each adds a constructor
that turns PPO's config into the learner's parts and those read methods; the training itself,
``Learner.train``, is the shared one.
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf_ray.data.tokenization import build_tokenizer
from rlhf_ray.engines.generation import greedy_continuation
from rlhf_ray.models import build_scalar_model, response_logprobs
from rlhf_ray.models.build import build_policy_lm
from rlhf_ray.types import Rollout
from rlhf_ray.workers.interface import in_chunks, probe_batch
from rlhf_ray.workers.learner import Learner, NonFiniteLossError
from rlhf_ray.workers.objectives import PolicyObjective, ValueObjective, state_values

__all__ = ["NonFiniteLossError", "PolicyLearner", "ValueLearner"]


def ppo_shape(ppo_cfg) -> dict[str, Any]:
    """The learner's batch shape under ``ppo.*``: minibatch, micro-batch, epochs."""
    return {
        "minibatch": ppo_cfg.minibatch_size,
        "micro_batch": ppo_cfg.micro_batch_size,
        "epochs": ppo_cfg.epochs,
    }


class PolicyLearner(Learner):
    """The policy under DeepSpeed ZeRO (or plain torch), one rank of a data-parallel group."""

    def __init__(
        self,
        policy_cfg,
        ppo_cfg,
        tokenizer_cfg,
        temperature: float,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_threads: int | None = None,
        max_bad_steps: int = 3,
        top_k: int = 0,
        top_p: float = 1.0,
        total_steps: int | None = None,
        reference_from_base: bool = False,
    ):
        """``temperature``, ``top_k``, ``top_p``: the sampler's (``rollout.*``); the policy's
        log-probs and entropy are those of the distribution the rollout samples from.
        ``total_steps``: optimizer steps of the run (what the LR schedule spans).
        ``reference_from_base``: a LoRA policy's scoring also gives the reference log-probs,
        those of its base with the adapters disabled (``reference.from_policy_base``)."""
        tok = build_tokenizer(tokenizer_cfg)
        self.tokenizer = tok
        self.reference_from_base = reference_from_base
        self.sampling: dict[str, Any] = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        super().__init__(
            policy_cfg,
            policy_cfg.model,
            policy_cfg.optim,
            lambda: build_policy_lm(policy_cfg.model, policy_cfg.lora, tok),
            PolicyObjective(ppo_cfg, self.sampling),
            **ppo_shape(ppo_cfg),
            rank=rank,
            world_size=world_size,
            seed=seed,
            num_threads=num_threads,
            max_bad_steps=max_bad_steps,
            total_steps=total_steps,
            idle_rounds=ppo_cfg.critic_warmup_rounds,  # the critic learns alone then
            target_kl=ppo_cfg.target_kl,  # KL early stopping: the policy's only (README)
        )

    @torch.no_grad()
    def old_logprobs(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """Old log-probs ``(B, R)`` of this rank's rows (recomputed here, not taken from the
        sampler), ``outside_filter (B, R)``: response tokens that lie outside this policy's
        top-k / top-p set although the sampler drew them (float differences at the edge), and
        ``full_logprobs (B, R)``: the same tokens under the unfiltered distribution (the KL's)."""
        mine = rollout.select(self.my_rows(len(rollout)))

        def forward(part: Rollout) -> torch.Tensor:
            outside: list[torch.Tensor] = []
            full: list[torch.Tensor] = []
            logprobs, _ = response_logprobs(
                self.module,
                part.input_ids,
                part.attention_mask,
                part.prompt_len,
                **self.sampling,
                outside=outside,
                full=full,
            )
            return torch.stack([logprobs, outside[0].float(), full[0]], -1)

        out = in_chunks(mine, self.score_batch, self.device, forward)
        mask = mine.response_mask
        reference = {"ref_logprobs": self.base_logprobs(mine)} if self.reference_from_base else {}
        return {
            "old_logprobs": out[..., 0] * mask,
            "outside_filter": (out[..., 1] * mask) > 0,
            "full_logprobs": out[..., 2] * mask,
            **reference,
        }

    @torch.no_grad()
    def base_logprobs(self, rows: Rollout) -> torch.Tensor:
        """Log-probs ``(B, R)`` of ``rows`` under the LoRA policy's base, its adapters disabled
        (peft's ``disable_adapter``): the reference of ``reference.from_policy_base``, at the
        sampling temperature like the reference actor's."""
        if not self.lora:
            raise RuntimeError("reference.from_policy_base needs a LoRA policy")

        def forward(part: Rollout) -> torch.Tensor:
            return response_logprobs(
                self.module,
                part.input_ids,
                part.attention_mask,
                part.prompt_len,
                self.sampling["temperature"],
            )[0]

        with self.module.disable_adapter():
            out = in_chunks(rows, self.score_batch, self.device, forward)
        return out * rows.response_mask

    @torch.no_grad()
    def greedy(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int
    ) -> torch.Tensor:
        """The learner's own greedy continuation (collective under ZeRO-3: call on all ranks)."""
        assert self.engine is not None, "call setup() first"
        with self.engine.full_params():
            return greedy_continuation(
                self.module,
                prompt_ids,
                prompt_mask,
                max_new_tokens,
                self.tokenizer.eos_id,
                self.tokenizer.pad_id,
            )

    @torch.no_grad()
    def probe_logprobs(self) -> torch.Tensor:
        """Log-probs ``(T-1,)`` of the sync probe (collective under ZeRO-3: call on all ranks)."""
        ids, mask = probe_batch(self.tokenizer)
        out = response_logprobs(
            self.module, ids.to(self.device), mask.to(self.device), 1, self.sampling["temperature"]
        )[0]
        return out[0].cpu()


class ValueLearner(Learner):
    """The critic (backbone + scalar head), one rank of a data-parallel group."""

    def __init__(
        self,
        value_cfg,
        ppo_cfg,
        tokenizer_cfg,
        model_spec=None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_threads: int | None = None,
        max_bad_steps: int = 3,
        total_steps: int | None = None,
    ):
        """``model_spec``: the initial weights (default ``value_cfg.model``; see
        ``config.value_init_spec``: LoRA on the reward model with ``init_from_reward``);
        ``total_steps``: optimizer steps of the run."""
        tok = build_tokenizer(tokenizer_cfg)
        spec = model_spec or value_cfg.model
        super().__init__(
            value_cfg,
            spec,
            value_cfg.optim,
            lambda: build_scalar_model(spec, tok, lora=value_cfg.lora),
            ValueObjective(ppo_cfg.value_clip_eps),
            **ppo_shape(ppo_cfg),
            rank=rank,
            world_size=world_size,
            seed=seed,
            num_threads=num_threads,
            max_bad_steps=max_bad_steps,
            total_steps=total_steps,
        )

    @torch.no_grad()
    def values(self, rollout: Rollout) -> torch.Tensor:
        mine = rollout.select(self.my_rows(len(rollout)))

        def forward(part: Rollout) -> torch.Tensor:
            return state_values(self.module, part.input_ids, part.attention_mask, part.prompt_len)

        return in_chunks(mine, self.score_batch, self.device, forward) * mine.response_mask
