"""InProcessWorkers: every role as a plain object in this process.

The same worker classes the Ray runtime wraps, with one rank per learner group. The split of
prompts over ``rollout.num_workers`` generators and the sampling seeds are those of the Ray
runtime, so a run here is the distributed run without the distribution. A critic-free estimator
(``algo.estimator`` other than gae) has no value learner.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from rlhf_ray.config.ppo import (
    has_critic,
    optimizer_steps,
    policy_optimizer_steps,
    policy_tokenizer,
    value_init_spec,
)
from rlhf_ray.engines.training import free_port
from rlhf_ray.rewards.remote import driver_options
from rlhf_ray.types import PPOBatch, PromptBatch, Rollout, Rows
from rlhf_ray.workers.interface import round_seed, shard_rows, sync_bytes
from rlhf_ray.workers.learners import PolicyLearner, ValueLearner
from rlhf_ray.workers.rollout import RolloutGenerator
from rlhf_ray.workers.scorers import ReferenceScorer, RewardScorer
from rlhf_ray.workers.stage_learners import RewardLearner, StageRole
from rlhf_ray.workers.sync import stream_buckets
from rlhf_ray.workers.vllm_rollout import generator_class, generator_kwargs


def build_learner(
    cfg, role: str, rank: int = 0, world_size: int = 1, threads: int | None = None
) -> PolicyLearner | ValueLearner:
    """The ``role`` ("policy" or "value") learner of rank ``rank`` of ``world_size``, not set
    up yet (``rlhf-ray replay`` builds each rank of a multi-rank run so), with at most
    ``threads`` torch threads."""
    tok, bad = policy_tokenizer(cfg), cfg.train.max_bad_steps
    where = {"rank": rank, "world_size": world_size, "num_threads": threads}
    if role == "policy":
        return PolicyLearner(
            cfg.policy,
            cfg.ppo,
            tok,
            cfg.rollout.temperature,
            seed=cfg.train.seed,
            max_bad_steps=bad,
            top_k=cfg.rollout.top_k,
            top_p=cfg.rollout.top_p,
            total_steps=policy_optimizer_steps(cfg),
            reference_from_base=cfg.reference.from_policy_base,
            **where,
        )
    return ValueLearner(
        cfg.value,
        cfg.ppo,
        tok,
        value_init_spec(cfg),
        seed=cfg.train.seed,
        max_bad_steps=bad,
        total_steps=optimizer_steps(cfg),
        **where,
    )


def build_learners(cfg) -> tuple[PolicyLearner, ValueLearner | None]:
    """The policy learner and the value learner (None without a critic), one rank each, set up
    in this process."""
    policy = build_learner(cfg, "policy")
    value = build_learner(cfg, "value") if has_critic(cfg) else None
    if any(learner and learner.engine_name == "deepspeed" for learner in (policy, value)):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # one process can hold one process group: both learners share a world of size 1
        policy.init_process_group("127.0.0.1", free_port(), cfg.train.dist_timeout_s)
    policy.setup()
    if value:
        value.setup()
    return policy, value  # type: ignore[return-value]


class InProcessWorkers:
    def __init__(self, cfg):
        self.cfg = cfg
        tok = policy_tokenizer(cfg)
        self.policy, self.value = build_learners(cfg)
        ref_spec = cfg.reference.model or cfg.policy.model
        self.reference = None  # (from_policy_base: the policy learner scores the reference)
        if not cfg.reference.from_policy_base:
            self.reference = ReferenceScorer(
                ref_spec,
                tok,
                cfg.rollout.temperature,
                chunk_size=cfg.reference.score_micro_batch_size,
            )
        self.reward = RewardScorer(
            cfg.reward,
            tok,
            search_path=[os.getcwd()],
            chunk_size=cfg.reward.score_micro_batch_size,
            remote=driver_options(cfg.reward, cfg.train.phase_timeout_s),
        )
        self.generators = [self._new_generator(i) for i in range(cfg.rollout.num_workers)]
        self.version = -1
        self.last_sync: dict[str, float] = {}  # sync/seconds of the latest sync (bytes: info)
        # the reference starts as a copy of the policy; a LoRA policy's initial model is the one
        # its spec describes (fresh adapters do nothing; an adapter start is read merged), which
        # the reference built itself
        if self.reference is not None and cfg.reference.model is None and not self.policy.lora:
            reference = self.reference
            self._stream(lambda bucket, k, n: reference.load_bucket(bucket))

    def _new_generator(self, worker_id: int) -> RolloutGenerator:
        cfg = self.cfg
        return generator_class(cfg.rollout)(
            cfg.policy.model,
            policy_tokenizer(cfg),
            cfg.rollout,
            worker_id,
            from_sync=True,
            **({"lora": cfg.policy.lora} if cfg.policy.lora is not None else {}),
            **generator_kwargs(cfg),
        )

    def _stream(self, load) -> None:
        """The policy's current weights, bucket by bucket, to ``load(bucket, k, count)``."""
        mb = self.cfg.sync.bucket_mb
        count = self.policy.num_weight_buckets(mb)
        stream_buckets(
            count,
            lambda k: lambda: self.policy.weight_bucket(k, mb),
            lambda bucket, k: load(bucket, k, count),
        )

    def sync(self, version: int) -> None:
        """In one process there is no transport (``sync.transport`` applies to Ray): the
        buckets are handed to the generators."""
        self.version, start = version, time.perf_counter()
        self._stream(
            lambda bucket, k, n: [g.load_bucket(bucket, version, k, n) for g in self.generators]
        )
        self.last_sync = {
            "sync/seconds": time.perf_counter() - start,
        }

    def scale_rollout(self, num_workers: int) -> None:
        while len(self.generators) > num_workers:
            self.generators.pop()
        new: list[RolloutGenerator] = []
        while len(self.generators) + len(new) < num_workers:
            new.append(self._new_generator(len(self.generators) + len(new)))
        if new:  # the policy still holds the weights of the last sync: stream them again
            self._stream(
                lambda bucket, k, n: [g.load_bucket(bucket, self.version, k, n) for g in new]
            )
            self.generators.extend(new)

    def generate(self, prompts: PromptBatch, round_index: int, version: int) -> Rollout:
        parts = shard_rows(len(prompts), len(self.generators), self.cfg.rollout.micro_batch_size)
        seed = round_seed(self.cfg.train.seed, round_index)
        return Rollout.concat(
            [
                gen.generate(prompts.select(rows), seed, version)
                for gen, rows in zip(self.generators, parts, strict=False)
            ]
        )

    def score(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        reference = {"ref_logprobs": self.reference.logprobs(rollout)} if self.reference else {}
        return {
            **reference,
            **self.policy.old_logprobs(rollout),  # (and ref_logprobs with from_policy_base)
            **({"values": self.value.values(rollout)} if self.value else {}),
            **self.reward.score_parts(rollout),  # scores and its parts
        }

    def update(self, batch: PPOBatch, round_index: int) -> dict[str, float]:
        value_stats = self.value.train(batch, round_index) if self.value else {}
        return {**self.policy.train(batch, round_index), **value_stats}

    def probe_sync(self, version: int) -> tuple[float, int]:
        gen = self.generators[version % len(self.generators)]
        diff = (self.policy.probe_logprobs() - gen.probe_logprobs()).abs().max()
        return float(diff), gen.worker_id

    def info(self) -> dict[str, float]:
        sent, full = self.policy.sync_nbytes()
        return {
            "rollout/num_workers": len(self.generators),
            **sync_bytes(sent, full),
            **self.last_sync,
        }

    def save(self, directory: Path, merged: bool = True) -> None:
        self.policy.save(str(directory / "policy"), merged)
        if self.value:
            self.value.save(str(directory / "value"), merged)

    def save_state(self, directory: Path) -> None:
        self.policy.save_state(str(directory / "policy_state"))
        if self.value:
            self.value.save_state(str(directory / "value_state"))

    def load_state(self, directory: Path) -> None:
        self.policy.load_state(str(directory / "policy_state"))
        if self.value:
            self.value.load_state(str(directory / "value_state"))

    def close(self) -> None:
        self.generators.clear()


class InProcessStage:
    """A stage's learner as one plain object in this process (a world of one rank): the
    ``StageWorkers`` that ``run_sft`` / ``run_train_rm`` use with ``--in-process``."""

    def __init__(self, role: StageRole, dist_timeout_s: int):
        self.learner = role.cls(role.role_cfg, **role.kwargs)
        if self.learner.engine_name == "deepspeed":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            self.learner.init_process_group("127.0.0.1", free_port(), dist_timeout_s)
        self.learner.setup()

    def load_data(self, train: Rows, eval_set: Rows | None) -> None:
        self.learner.load_data(train, eval_set)

    def train_step(self, epoch: int, step: int) -> dict[str, float]:
        return self.learner.train_step(epoch, step)

    def evaluate(self, split: str) -> dict[str, float]:
        return self.learner.evaluate(split)

    def scores(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        assert isinstance(self.learner, RewardLearner), "scores() needs a reward learner"
        return self.learner.scores(split)

    def save(self, directory: Path) -> None:
        self.learner.save(str(directory))

    def close(self) -> None:
        self.learner.engine = None

    def save_state(self, directory: Path) -> None:
        self.learner.save_state(str(directory))

    def load_state(self, directory: Path) -> None:
        self.learner.load_state(str(directory))
