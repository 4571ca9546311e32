"""PolicyLearner and ValueLearner: one data-parallel rank each.

Every rank receives the whole round's batch and derives its rows from a permutation seeded by
(seed, round, epoch), identical on every rank. Minibatch ``k`` of an epoch is the same global set
of rows whatever the number of ranks, and each rank's loss is rescaled so that the gradient
averaged over ranks equals the gradient of the loss over the global minibatch (token mean, or
the per-sequence means of ``ppo.loss_agg``). So 1 rank, 2 ranks, ZeRO-1 and ZeRO-3 take the same
optimizer steps (up to float rounding).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rlhf_ray.algo import (
    aggregate_loss,
    aggregation_weight,
    kl_loss,
    masked_mean,
    policy_loss,
    value_loss,
)
from rlhf_ray.engines.generation import greedy_continuation
from rlhf_ray.engines.training import DeepSpeedEngine, TorchEngine, init_distributed
from rlhf_ray.errors import UserError
from rlhf_ray.models import (
    build_causal_lm,
    build_scalar_model,
    default_device,
    response_logprobs,
)
from rlhf_ray.models.weights import NumpyWeights, state_dict_to_numpy
from rlhf_ray.tokenization import build_tokenizer
from rlhf_ray.types import PPOBatch, Rollout
from rlhf_ray.workers.interface import in_chunks, probe_batch

LossFn = Callable[[PPOBatch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class NonFiniteLossError(UserError):
    """``train.max_bad_steps`` updates in a row had a non-finite loss or gradient."""


class _Rank:
    """What both learners share: the engine, their rows of a batch, the PPO epoch loop."""

    def __init__(
        self,
        role_cfg,
        ppo_cfg,
        build: Callable[[], torch.nn.Module],
        rank: int,
        world_size: int,
        seed: int,
        num_threads: int | None,
        micro_batch: int | None = None,
        max_bad_steps: int = 3,
    ):
        """``micro_batch``: rows per rank per step (default: the PPO minibatch's share); the
        stages of ``workers.stage_learners`` pass it and no ``ppo_cfg``."""
        if num_threads:
            torch.set_num_threads(num_threads)
        self.cfg, self.ppo = role_cfg, ppo_cfg
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.micro_batch = micro_batch or ppo_cfg.minibatch_size // world_size
        self.max_bad_steps = max_bad_steps
        self.bad_in_row = 0  # non-finite updates in a row (the same on every rank)
        self.loss_agg = "token_mean"  # how loss_fn aggregates its per-token losses
        self._build = build
        self.engine: TorchEngine | DeepSpeedEngine | None = None

    def init_process_group(
        self, master_addr: str, master_port: int, timeout_s: int, backend: str = "gloo"
    ) -> None:
        init_distributed(self.rank, self.world_size, master_addr, master_port, timeout_s, backend)

    def setup(self) -> tuple[int, int]:
        """Build the model and engine; returns (parameters held here, parameters in all)."""
        self.device = default_device()
        module = self._build().to(self.device)
        module.train()
        if self.cfg.engine == "torch":
            self.engine = TorchEngine(module, self.cfg.optim)
        else:
            self.engine = DeepSpeedEngine(
                module,
                self.cfg.optim,
                self.cfg.zero_stage,
                self.micro_batch,
                self.cfg.model.dtype,
                self.cfg.offload_optimizer,
            )
        return self.engine.local_param_count()

    @property
    def module(self) -> Any:  # the (DeepSpeed-wrapped) HF model
        assert self.engine is not None, "call setup() first"
        return self.engine.module

    def my_rows(self, n: int) -> slice:
        per = n // self.world_size
        return slice(self.rank * per, (self.rank + 1) * per)

    def run_epochs(self, batch: PPOBatch, round_index: int, loss_fn: LossFn) -> dict[str, float]:
        assert self.engine is not None, "call setup() first"
        n, size = len(batch), self.ppo.minibatch_size
        gen = torch.Generator().manual_seed(self.seed * 7919 + round_index)
        sums: dict[str, float] = defaultdict(float)
        steps = 0
        for _ in range(self.ppo.epochs):
            perm = torch.randperm(n, generator=gen)
            for start in range(0, n, size):
                rows = perm[start : start + size]
                mine = rows[self.my_rows(size)]
                mb = batch.select(mine).to(self.device)
                loss, stats = loss_fn(mb)
                if not self._finite_everywhere(loss):  # every rank skips: ZeRO stays in step
                    self._bad_step(round_index)
                    continue
                # the loss over the GLOBAL minibatch, given that ranks' grads are averaged
                local = aggregation_weight(mb.response_mask, self.loss_agg)
                total = aggregation_weight(batch.response_mask[rows], self.loss_agg)
                self.engine.backward(loss * local * self.world_size / total)
                if not self.engine.step():  # a non-finite gradient: the engine skipped it
                    self._bad_step(round_index)
                    continue
                self.bad_in_row = 0
                sums["loss"] += float(loss.detach())
                for k, v in stats.items():
                    sums[k] += float(v)
                steps += 1
        skipped = self.ppo.epochs * -(-n // size) - steps
        out = {k: v / steps for k, v in sums.items()} if steps else {"loss": float("nan")}
        return {**out, "skipped_steps": float(skipped)}

    def _finite_everywhere(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every rank (one all-reduce: all ranks decide alike)."""
        assert self.engine is not None
        bad = 0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0
        return self.engine.all_reduce_sum(bad) == 0.0

    def _bad_step(self, round_index: int) -> None:
        self.bad_in_row += 1
        if self.bad_in_row >= self.max_bad_steps:
            raise NonFiniteLossError(
                f"{type(self).__name__}: {self.bad_in_row} updates in a row had a non-finite "
                f"loss or gradient (round {round_index}; train.max_bad_steps="
                f"{self.max_bad_steps}); the run stops rather than train on them. Lower the "
                "learning rate, check the rewards, or resume from the last checkpoint."
            )

    def full_weights(self) -> NumpyWeights | None:
        """Collective on all ranks; rank 0 returns the full weights as numpy arrays."""
        assert self.engine is not None, "call setup() first"
        state = self.engine.full_state_dict()
        return None if state is None else state_dict_to_numpy(state)

    def save(self, directory: str) -> None:
        """Collective; rank 0 writes the full model in Hugging Face format."""
        assert self.engine is not None, "call setup() first"
        state = self.engine.full_state_dict()
        if state is not None:
            Path(directory).mkdir(parents=True, exist_ok=True)
            self.module.save_pretrained(directory, state_dict=state)

    def save_state(self, directory: str) -> None:
        """Collective: everything this group needs to resume training exactly."""
        assert self.engine is not None, "call setup() first"
        self.engine.save_state(directory)

    def load_state(self, directory: str) -> None:
        assert self.engine is not None, "call setup() first"
        self.engine.load_state(directory)

    def ping(self) -> int:
        return self.rank


class PolicyLearner(_Rank):
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
    ):
        """``temperature``, ``top_k``, ``top_p``: the sampler's (``rollout.*``); the policy's
        log-probs and entropy are those of the distribution the rollout samples from."""
        tok = build_tokenizer(tokenizer_cfg)
        super().__init__(
            policy_cfg,
            ppo_cfg,
            lambda: build_causal_lm(policy_cfg.model, tok),
            rank,
            world_size,
            seed,
            num_threads,
            max_bad_steps=max_bad_steps,
        )
        self.tokenizer = tok
        self.sampling: dict[str, Any] = {"temperature": temperature, "top_k": top_k,
                                         "top_p": top_p}  # fmt: skip
        self.loss_agg = ppo_cfg.loss_agg

    @torch.no_grad()
    def old_logprobs(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """Old log-probs ``(B, R)`` of this rank's rows (recomputed here, not taken from the
        sampler), and ``outside_filter (B, R)``: response tokens that lie outside this policy's
        top-k / top-p set although the sampler drew them (float differences at the edge)."""
        mine = rollout.select(self.my_rows(len(rollout)))

        def forward(part: Rollout) -> torch.Tensor:
            outside: list[torch.Tensor] = []
            logprobs, _ = response_logprobs(self.module, part.input_ids, part.attention_mask,
                                            part.prompt_len, **self.sampling, outside=outside)  # fmt: skip
            return torch.stack([logprobs, outside[0].float()], -1)

        both = in_chunks(mine, self.micro_batch, self.device, forward)
        mask = mine.response_mask
        return {"old_logprobs": both[..., 0] * mask, "outside_filter": (both[..., 1] * mask) > 0}

    @torch.no_grad()
    def greedy(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int
    ) -> torch.Tensor:
        """The learner's own greedy continuation (collective under ZeRO-3: call on all ranks)."""
        assert self.engine is not None, "call setup() first"
        with self.engine.full_params():
            return greedy_continuation(self.module, prompt_ids, prompt_mask, max_new_tokens,
                                       self.tokenizer.eos_id, self.tokenizer.pad_id)  # fmt: skip

    @torch.no_grad()
    def probe_logprobs(self) -> torch.Tensor:
        """Log-probs ``(T-1,)`` of the sync probe (collective under ZeRO-3: call on all ranks)."""
        ids, mask = probe_batch(self.tokenizer)
        out = response_logprobs(self.module, ids.to(self.device), mask.to(self.device), 1,
                                self.sampling["temperature"])[0]  # fmt: skip
        return out[0].cpu()

    def train(self, batch: PPOBatch, round_index: int) -> dict[str, float]:
        """PPO epochs; none in the first ``ppo.critic_warmup_rounds`` rounds (the critic
        learns alone then), which return no stats."""
        if round_index < self.ppo.critic_warmup_rounds:
            return {}

        def loss_fn(mb: PPOBatch):
            logprobs, entropy = response_logprobs(
                self.module,
                mb.input_ids,
                mb.attention_mask,
                mb.prompt_len,
                **self.sampling,
                with_entropy=True,
                entropy_grad=self.ppo.entropy_coef > 0,
            )
            mask, agg = mb.response_mask, self.loss_agg
            loss, stats = policy_loss(
                logprobs, mb.old_logprobs, mb.advantages, mask, self.ppo.clip_eps, agg
            )
            assert entropy is not None
            stats["entropy"] = masked_mean(entropy.detach(), mask)
            if self.ppo.entropy_coef > 0:
                loss = loss - self.ppo.entropy_coef * aggregate_loss(entropy, mask, agg)
            if self.ppo.kl_in_loss is not None:
                kl = kl_loss(logprobs, mb.ref_logprobs, mask, self.ppo.kl_in_loss, agg)
                loss = loss + self.ppo.kl_loss_coef * kl
                stats["kl_loss"] = kl.detach()
            return loss, stats

        stats = self.run_epochs(batch, round_index, loss_fn)
        stats["policy_loss"] = stats.pop("loss")
        stats["policy_skipped_steps"] = stats.pop("skipped_steps")
        return stats


class ValueLearner(_Rank):
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
    ):
        """``model_spec``: the initial weights (default ``value_cfg.model``; see
        ``config.value_init_spec``)."""
        tok = build_tokenizer(tokenizer_cfg)
        spec = model_spec or value_cfg.model
        super().__init__(
            value_cfg,
            ppo_cfg,
            lambda: build_scalar_model(spec, tok),
            rank,
            world_size,
            seed,
            num_threads,
            max_bad_steps=max_bad_steps,
        )

    def _values(self, input_ids, attention_mask, prompt_len: int) -> torch.Tensor:
        # the value of the state before response token t sits at position prompt_len - 1 + t
        return self.module(input_ids, attention_mask)[:, prompt_len - 1 : -1]

    @torch.no_grad()
    def values(self, rollout: Rollout) -> torch.Tensor:
        mine = rollout.select(self.my_rows(len(rollout)))

        def forward(part: Rollout) -> torch.Tensor:
            return self._values(part.input_ids, part.attention_mask, part.prompt_len)

        return in_chunks(mine, self.micro_batch, self.device, forward) * mine.response_mask

    def train(self, batch: PPOBatch, round_index: int) -> dict[str, float]:
        def loss_fn(mb: PPOBatch):
            values = self._values(mb.input_ids, mb.attention_mask, mb.prompt_len)
            return value_loss(
                values, mb.old_values, mb.returns, mb.response_mask, self.ppo.value_clip_eps
            )

        stats = self.run_epochs(batch, round_index, loss_fn)
        stats["value_loss"] = stats.pop("loss")
        stats["value_skipped_steps"] = stats.pop("skipped_steps")
        return stats
