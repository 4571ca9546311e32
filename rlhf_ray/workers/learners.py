"""PolicyLearner and ValueLearner: one data-parallel rank each.

Every rank receives the whole round's batch and takes its rows from a permutation seeded by
(seed, round, epoch): minibatch ``k`` is the same global rows whatever the number of ranks, and
each rank's loss is rescaled so that the gradient averaged over ranks is that of the loss over
the global minibatch (any ``ppo.loss_agg``). So 1 rank, 2 ranks, ZeRO-1 and ZeRO-3 take the same
optimizer steps (up to float rounding)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rlhf_ray.accelerator import check_deepspeed_accelerator
from rlhf_ray.algo import (
    aggregate_loss,
    aggregation_weight,
    kl_loss,
    masked_mean,
    policy_loss,
    value_loss,
)
from rlhf_ray.engines.generation import greedy_continuation
from rlhf_ray.engines.training import (
    DeepSpeedEngine,
    TorchEngine,
    deepspeed_config,
    init_distributed,
    zero3_construction,
)
from rlhf_ray.errors import UserError
from rlhf_ray.models import (
    build_causal_lm,
    build_scalar_model,
    default_device,
    response_logprobs,
)
from rlhf_ray.models.weights import (
    NumpyWeights,
    full_nbytes,
    plan_buckets,
    state_dict_to_numpy,
    weight_tensors,
)
from rlhf_ray.tokenization import build_tokenizer
from rlhf_ray.types import PPOBatch, Rollout
from rlhf_ray.workers.interface import in_chunks, probe_batch

LossFn = Callable[[PPOBatch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class NonFiniteLossError(UserError):
    """``train.max_bad_steps`` updates in a row had a non-finite loss or gradient."""


class LearnerRank:
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
        total_steps: int | None = None,
    ):
        """``micro_batch``: rows per rank per step (default: the PPO minibatch's share); the
        stages of ``workers.stage_learners`` pass it and no ``ppo_cfg``."""
        if num_threads:
            torch.set_num_threads(num_threads)
        self.cfg, self.ppo = role_cfg, ppo_cfg
        self.rank, self.world_size, self.seed = rank, world_size, seed
        # this rank's rows of a minibatch, run as micro-batches of `ppo.micro_batch_size` rows
        share = micro_batch or ppo_cfg.minibatch_size // world_size
        self.micro_batch = getattr(ppo_cfg, "micro_batch_size", None) or share
        self.accumulation = share // self.micro_batch
        self.score_batch = getattr(role_cfg, "score_micro_batch_size", share)
        self.total_steps = total_steps
        # a checkpoint is loaded straight into ZeRO-3 partitions; a preset's seeded random
        # init is only reproduced by a plain build (transformers' ZeRO-3 init differs)
        self.model_path = getattr(getattr(role_cfg, "model", None), "path", None)
        self.max_bad_steps = max_bad_steps
        self.bad_in_row = 0  # non-finite updates in a row (the same on every rank)
        self.loss_agg = "token_mean"  # how loss_fn aggregates its per-token losses
        self._build = build
        self.engine: TorchEngine | DeepSpeedEngine | None = None
        self._buckets: tuple[float, list[list[str]]] | None = None  # (bucket_mb, names)

    def init_process_group(
        self, master_addr: str, master_port: int, timeout_s: int, backend: str = "gloo"
    ) -> None:
        init_distributed(self.rank, self.world_size, master_addr, master_port, timeout_s, backend)

    def setup(self) -> tuple[int, int]:
        """Build the model and engine; returns (parameters held here, parameters in all).

        Under ZeRO-3 a model loaded from a path is partitioned while it is loaded
        (``zero3_construction``): no rank ever holds all of it. A preset (tiny, random) is
        built whole, then partitioned."""
        self.device = default_device()
        cfg = self.cfg
        if cfg.engine != "torch":
            check_deepspeed_accelerator(self.device)
        if cfg.engine == "torch":
            module = self._build().to(self.device)
            self._prepare(module)
            self.engine = TorchEngine(module, cfg.optim, self.accumulation, self.total_steps)
            return self.engine.local_param_count()
        import torch.distributed as dist

        config = deepspeed_config(
            cfg.zero_stage,
            self.micro_batch,
            dist.get_world_size(),
            cfg.optim.grad_clip,
            cfg.model.dtype,
            cfg.offload_optimizer,
            self.accumulation,
            getattr(cfg, "offload_params", False),
            cfg.zero_buckets.resolve(on_gpu=self.device.type != "cpu"),
        )
        zero_init = cfg.zero_stage == 3 and self.model_path is not None
        with zero3_construction(config, enabled=zero_init):
            module = self._build()
        if not zero_init:
            module = module.to(self.device)
        self._prepare(module)
        self.engine = DeepSpeedEngine(
            module,
            cfg.optim,
            cfg.zero_stage,
            self.micro_batch,
            cfg.model.dtype,
            cfg.offload_optimizer,
            total_steps=self.total_steps,
            config=config,
        )
        return self.engine.local_param_count()

    def _prepare(self, module: torch.nn.Module) -> None:
        module.train()
        if getattr(self.cfg, "gradient_checkpointing", False):
            hf: Any = getattr(module, "seq_cls", module)  # ScalarHeadModel wraps the HF model
            kwargs = {"use_reentrant": False}  # reentrant checkpoints lose grads of frozen inputs
            if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5.2x
                hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

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
                if self._minibatch(batch, rows, loss_fn, sums):
                    self.bad_in_row = 0
                    steps += 1
                else:
                    self._bad_step(round_index)
        skipped = self.ppo.epochs * -(-n // size) - steps
        out = {k: v / steps for k, v in sums.items()} if steps else {"loss": float("nan")}
        return {**out, "skipped_steps": float(skipped)}

    def _minibatch(
        self, batch: PPOBatch, rows: torch.Tensor, loss_fn: LossFn, sums: dict[str, float]
    ) -> bool:
        """One optimizer step on the global minibatch ``rows``: this rank's share, as
        ``accumulation`` micro-batches. Adds the step's mean stats to ``sums`` and returns True,
        or returns False when the update is not clean: a micro-batch's loss is non-finite on some
        rank (agreed by one all-reduce, so every rank does the same), or the engine skipped the
        step for a non-finite gradient.

        A non-finite micro-batch is left out of the gradient. With one micro-batch per step that
        skips the whole update; with several, the engine still steps (ZeRO's accumulation
        boundary stays aligned on every rank) on the other micro-batches' gradients."""
        assert self.engine is not None
        mine = rows[self.my_rows(len(rows))]
        # each micro-batch's loss is weighted by its share of the GLOBAL minibatch's (token or
        # sequence) count: ranks' grads are averaged and micro-batches' grads add up
        total = aggregation_weight(batch.response_mask[rows], self.loss_agg)
        clean, applied, micro = True, None, dict[str, float]()
        for first in range(0, len(mine), self.micro_batch):
            mb = batch.select(mine[first : first + self.micro_batch]).to(self.device)
            loss, stats = loss_fn(mb)
            if not self._finite_everywhere(loss):
                clean = False
                if self.accumulation == 1:
                    return False
            else:
                local = aggregation_weight(mb.response_mask, self.loss_agg)
                self.engine.backward(loss * local * self.world_size / total)
                for k, v in {"loss": loss, **stats}.items():
                    micro[k] = (
                        micro.get(k, 0.0) + float(torch.as_tensor(v).detach()) / self.accumulation
                    )
            applied = self.engine.step()
            last = first + self.micro_batch >= len(mine)
            if (applied is not None) != last:
                raise RuntimeError(
                    "engine and learner disagree on the accumulation boundary (micro-batch "
                    f"ending at row {first + self.micro_batch} of {len(mine)}, engine at a "
                    f"boundary: {applied is not None})"
                )
        if not (clean and applied):
            return False
        for key, value in micro.items():
            sums[key] += value
        return True

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

    def _bucket_names(self, bucket_mb: float) -> list[list[str]]:
        if self._buckets is None or self._buckets[0] != bucket_mb:
            tensors = list(weight_tensors(self.module).items())
            sizes = [full_nbytes(t) for _, t in tensors]
            groups = plan_buckets(sizes, int(bucket_mb * 2**20))
            self._buckets = (bucket_mb, [[tensors[i][0] for i in g] for g in groups])
        return self._buckets[1]

    def num_weight_buckets(self, bucket_mb: float) -> int:
        """How many buckets of about ``bucket_mb`` MB the weights travel in."""
        return len(self._bucket_names(bucket_mb))

    def weight_bucket(self, index: int, bucket_mb: float) -> NumpyWeights | None:
        """Collective on all ranks (ZeRO-3 gathers only this bucket's tensors); rank 0 returns
        bucket ``index`` as numpy arrays, the others None."""
        assert self.engine is not None, "call setup() first"
        tensors = weight_tensors(self.module)
        names = self._bucket_names(bucket_mb)[index]
        if getattr(self.engine, "zero_stage", 0) == 3:  # the partitions are sent to rank 0
            assert isinstance(self.engine, DeepSpeedEngine)
            whole = self.engine.whole_on_rank0({n: tensors[n] for n in names})
            return None if whole is None else state_dict_to_numpy(whole)
        if self.rank != 0:
            return None
        # on CPU the arrays view the live parameters: Ray copies them into the object store
        bucket = {n: tensors[n].detach() for n in names}
        if self.device.type != "cpu":
            bucket = {n: t.to("cpu", copy=True) for n, t in bucket.items()}
        return state_dict_to_numpy(bucket)

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


class PolicyLearner(LearnerRank):
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
    ):
        """``temperature``, ``top_k``, ``top_p``: the sampler's (``rollout.*``); the policy's
        log-probs and entropy are those of the distribution the rollout samples from.
        ``total_steps``: optimizer steps of the run (what the LR schedule spans)."""
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
            total_steps=total_steps,
        )
        self.tokenizer = tok
        self.sampling: dict[str, Any] = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        self.loss_agg = ppo_cfg.loss_agg

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
        return {
            "old_logprobs": out[..., 0] * mask,
            "outside_filter": (out[..., 1] * mask) > 0,
            "full_logprobs": out[..., 2] * mask,
        }

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

    def train(self, batch: PPOBatch, round_index: int) -> dict[str, float]:
        """PPO epochs; none in the first ``ppo.critic_warmup_rounds`` rounds (the critic
        learns alone then), which return no stats."""
        if round_index < self.ppo.critic_warmup_rounds:
            return {}

        def loss_fn(mb: PPOBatch):
            full: list[torch.Tensor] = []  # unfiltered log-probs: the KL's (models/logprobs.py)
            logprobs, entropy = response_logprobs(
                self.module,
                mb.input_ids,
                mb.attention_mask,
                mb.prompt_len,
                **self.sampling,
                with_entropy=True,
                entropy_grad=self.ppo.entropy_coef > 0,
                full=full,
            )
            mask, agg = mb.response_mask, self.loss_agg
            loss, stats = policy_loss(
                logprobs,
                mb.old_logprobs,
                mb.advantages,
                mask,
                self.ppo.clip_eps,
                agg,
                self.ppo.dual_clip,
            )
            assert entropy is not None
            stats["entropy"] = masked_mean(entropy.detach(), mask)
            if self.ppo.entropy_coef > 0:
                loss = loss - self.ppo.entropy_coef * aggregate_loss(entropy, mask, agg)
            if self.ppo.kl_in_loss is not None:
                kl = kl_loss(full[0], mb.ref_logprobs, mask, self.ppo.kl_in_loss, agg)
                loss = loss + self.ppo.kl_loss_coef * kl
                stats["kl_loss"] = kl.detach()
            return loss, stats

        stats = self.run_epochs(batch, round_index, loss_fn)
        stats["policy_loss"] = stats.pop("loss")
        stats["policy_lr"] = self.engine.lr()  # type: ignore[union-attr]  # the next step's
        stats["policy_skipped_steps"] = stats.pop("skipped_steps")
        return stats


class ValueLearner(LearnerRank):
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
        ``config.value_init_spec``); ``total_steps``: optimizer steps of the run."""
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
            total_steps=total_steps,
        )
        self.model_path = spec.path

    def _values(self, input_ids, attention_mask, prompt_len: int) -> torch.Tensor:
        # the value of the state before response token t sits at position prompt_len - 1 + t
        return self.module(input_ids, attention_mask)[:, prompt_len - 1 : -1]

    @torch.no_grad()
    def values(self, rollout: Rollout) -> torch.Tensor:
        mine = rollout.select(self.my_rows(len(rollout)))

        def forward(part: Rollout) -> torch.Tensor:
            return self._values(part.input_ids, part.attention_mask, part.prompt_len)

        return in_chunks(mine, self.score_batch, self.device, forward) * mine.response_mask

    def train(self, batch: PPOBatch, round_index: int) -> dict[str, float]:
        def loss_fn(mb: PPOBatch):
            values = self._values(mb.input_ids, mb.attention_mask, mb.prompt_len)
            return value_loss(
                values, mb.old_values, mb.returns, mb.response_mask, self.ppo.value_clip_eps
            )

        stats = self.run_epochs(batch, round_index, loss_fn)
        stats["value_loss"] = stats.pop("loss")
        stats["value_lr"] = self.engine.lr()  # type: ignore[union-attr]
        stats["value_skipped_steps"] = stats.pop("skipped_steps")
        return stats
