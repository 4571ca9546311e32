"""``RolloutPool``: the rollout workers, resizable and independent of the learners; it
streams weight buckets to them, splits a round over them and replaces a lost one
(``distributed/replacement.py`` chooses where)."""

from __future__ import annotations

import time
from typing import Any

import ray

from rlhf_ray.config.ppo import (
    Config,
    ModelSpec,
    TokenizerConfig,
    policy_tokenizer,
)
from rlhf_ray.config.stages import EvalConfig
from rlhf_ray.distributed.actors import (
    PlacementTimeoutError,
    kill_actors,
    spawn_actor,
    spread_strategy,
    wait_ready,
)
from rlhf_ray.distributed.replacement import MAX_TRIES, NodeHealth, unplaced
from rlhf_ray.distributed.weight_transport import CollectiveSender
from rlhf_ray.types import PromptBatch, Rollout
from rlhf_ray.workers.collective import WeightSyncError
from rlhf_ray.workers.interface import (
    round_seed,
    shard_rows,
)
from rlhf_ray.workers.vllm_rollout import generator_class, generator_kwargs


class RolloutPool:
    """Rollout generators ``rollout-<id>`` with their own resources, independent of learners.

    The pool keeps the object refs of every bucket of the latest weights it was sent (in the
    object store, not in any process), so a worker that joins (a resize, or the replacement of
    a dead one, also in the middle of a sync) receives all of them before it generates. Ids
    are never reused.
    """

    def __init__(
        self,
        cfg: Config | EvalConfig,
        model_spec: ModelSpec | None = None,
        tokenizer_cfg: TokenizerConfig | None = None,
        prefix: str = "rollout",
        seed: int | None = None,
    ):
        """Generators of ``model_spec`` named ``<prefix>-<id>``, sampling with ``seed``; PPO's
        pool leaves them unset: the policy's model and tokenizer, ``train.seed``."""
        self.cfg = cfg
        self.from_sync = model_spec is None  # PPO's workers get the policy's weights by sync
        if model_spec is None or tokenizer_cfg is None or seed is None:
            assert isinstance(cfg, Config), "an eval pool names its model, tokenizer and seed"
            model_spec, tokenizer_cfg = cfg.policy.model, policy_tokenizer(cfg)
            seed = cfg.train.seed
        self.model_spec, self.tokenizer_cfg, self.seed = model_spec, tokenizer_cfg, seed
        # a LoRA policy's workers load its base themselves; syncs bring the adapters
        self.lora = cfg.policy.lora if self.from_sync and isinstance(cfg, Config) else None
        self.prefix = prefix
        self.timeout_s = (
            cfg.train.phase_timeout_s if isinstance(cfg, Config) else cfg.eval.phase_timeout_s
        )
        self.workers: list[Any] = []
        self.restarts = 0
        self.health = NodeHealth()  # where replacements go; counts them
        self._next_id = 0
        self._version = -1
        self._count = 0  # buckets of `_version`
        self._buckets: list[Any] = []  # object refs of the buckets received so far
        # sends the current version again (set by RayWorkers): for buckets the object store
        # lost (policy rank 0's node died), so that a joining worker can still get them
        self.resync: Any = None
        self.sender: CollectiveSender | None = None  # set for sync.transport collective

    def _spawn(self, strategy: Any = None) -> tuple[str, Any]:
        r = self.cfg.rollout
        name = f"{self.prefix}-{self._next_id}"
        handle = spawn_actor(
            generator_class(r),
            name,
            r.num_cpus_per_worker,
            r.num_gpus_per_worker,
            self.model_spec,
            self.tokenizer_cfg,
            r,
            worker_id=self._next_id,
            strategy=strategy or spread_strategy(self.cfg),
            from_sync=self.from_sync,
            **generator_kwargs(self.cfg),
            **({"lora": self.lora} if self.lora is not None else {}),
        )
        self._next_id += 1
        return name, handle

    def grow(self, n: int, strategy: Any = None) -> None:
        """Add ``n`` workers, ready and holding the current weights; none if they cannot start
        (the nodes of those that died meanwhile are avoided from then on). Loading waits at
        most ``train.phase_timeout_s``; buckets the object store lost are sent again
        (``resync``) and loaded from there."""
        new = dict(self._spawn(strategy) for _ in range(n))
        try:
            wait_ready(new, self.cfg.cluster.actor_start_timeout_s)
            try:
                self._catch_up(list(new.values()))
            except ray.exceptions.ObjectLostError as exc:
                if self.resync is None:
                    raise
                print(
                    f"[rlhf_ray] weight buckets of version {self._version} were lost "
                    f"({type(exc).__name__}); syncing them again",
                    flush=True,
                )
                self.resync()  # a LearnerLostError if the policy is gone too: recovery's turn
                self._catch_up(list(new.values()))
        except BaseException as exc:
            if isinstance(exc, ray.exceptions.RayActorError):
                for handle in new.values():
                    self.health.lost(handle)
            kill_actors(list(new.values()))
            raise
        self.workers.extend(new.values())

    def _load_all(self, workers: list[Any]) -> None:
        """``workers`` load every bucket received so far, within ``train.phase_timeout_s``."""
        ray.get(
            [
                w.load_bucket.remote(ref, self._version, k, self._count)
                for w in workers
                for k, ref in enumerate(self._buckets)
            ],
            timeout=self.timeout_s,
        )

    def _catch_up(self, new: list[Any]) -> None:
        """The current version to workers that join: the kept refs, or a broadcast in a group
        of rank 0 and them (the policy still holds the weights of the last sync)."""
        if self.sender is None:
            self._load_all(new)
        elif self._version >= 0:
            outcome = self.sender.send(new, self._version, self._count)
            if not outcome.ok:
                why = "; ".join(outcome.lost.values()) or "the broadcast failed"
                raise WeightSyncError(f"a joining worker did not get the weights: {why}")

    def sync_collective(self, version: int, count: int) -> None:
        """Broadcast ``version`` in ``count`` buckets to every worker (``sync.transport``
        collective). Workers lost meanwhile are dropped and the broadcast retried on the
        survivors; then their replacements join, holding the version."""
        assert self.sender is not None, "sync.transport collective has a sender"
        causes: list[str] = []  # of the workers lost, each replaced once the others hold it
        for _ in range(MAX_TRIES):
            outcome = self.sender.send(self.workers, version, count)
            if outcome.ok:
                break
            for index in sorted(outcome.lost, reverse=True):
                causes.append(self._drop(index, outcome.lost[index]))
        else:
            raise WeightSyncError(f"the weight broadcast failed {MAX_TRIES} times in a row")
        self._version, self._count, self._buckets = version, count, []
        for cause in causes:
            self._add_replacement(len(self.workers), cause)

    def shrink(self, n: int) -> None:
        """Remove workers beyond the first ``n`` (between rounds: they hold no work)."""
        extra = self.workers[n:]
        del self.workers[n:]
        kill_actors(extra)

    @property
    def version(self) -> int:
        """The weight version the pool was last sent (-1: none yet)."""
        return self._version

    def begin(self, version: int, count: int) -> None:
        """A sync of ``version`` in ``count`` buckets starts (the old version's refs go)."""
        self._version, self._count, self._buckets = version, count, []

    def load_bucket(self, bucket_ref: Any, index: int) -> None:
        """Every worker loads bucket ``index``; one that died or is late is replaced (the
        replacement gets every bucket received so far, this one included)."""
        assert index == len(self._buckets), "buckets arrive in order"
        self._buckets.append(bucket_ref)
        args = (bucket_ref, self._version, index, self._count)
        refs = [w.load_bucket.remote(*args) for w in self.workers]
        deadline = time.monotonic() + self.timeout_s
        for worker, ref in enumerate(refs):
            try:
                ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            except ray.exceptions.RayActorError:
                self._replace(worker, "died while loading weights")
            except ray.exceptions.GetTimeoutError:
                self._replace(worker, "did not load weights within train.phase_timeout_s")

    def generate(self, prompts: PromptBatch, round_index: int, version: int) -> list[Rollout]:
        """One shard per worker. A worker that dies is replaced (with the current weights) and
        its shard redone with the same seed: no prompt is lost or sampled twice."""
        parts = shard_rows(len(prompts), len(self.workers), self.cfg.rollout.micro_batch_size)
        seeds = [round_seed(self.seed, round_index)] * len(parts)  # rows seed by index
        pending = {
            self.workers[i].generate.remote(prompts.select(rows), seeds[i], version): i
            for i, rows in enumerate(parts)
        }
        done: dict[int, Rollout] = {}

        def redo(shard: int, why: str) -> None:
            self._replace(shard, f"{why}; its shard is redone")
            work = prompts.select(parts[shard])
            pending[self.workers[shard].generate.remote(work, seeds[shard], version)] = shard

        deadline = time.monotonic() + self.timeout_s
        while pending:
            left = max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=left)
            if not ready:  # the late ones are treated as dead: replaced, their shards redone
                for shard in [pending.pop(ref) for ref in list(pending)]:
                    redo(shard, "did not answer within train.phase_timeout_s")
                deadline = time.monotonic() + self.timeout_s
                continue
            shard = pending.pop(ready[0])
            try:
                done[shard] = ray.get(ready[0])
            except ray.exceptions.RayActorError:
                redo(shard, "died while generating")
        return [done[i] for i in range(len(parts))]

    def _replace(self, index: int, why: str) -> None:
        """A fresh worker, holding the current weights, takes the place of a lost one; it is
        placed on a healthy node with its resources free (``distributed/replacement.py``), and
        replaced in turn if it dies before it is ready or cannot be placed in time (then
        elsewhere), at most ``MAX_TRIES`` times."""
        cause = self._drop(index, why)
        self._add_replacement(index, cause)

    def _drop(self, index: int, why: str) -> str:
        """Remove the lost worker ``index``; returns why, with its node."""
        if self.restarts >= 10 * len(self.workers):
            raise RuntimeError(f"rollout workers keep failing ({self.restarts} replaced)")
        lost = self.workers.pop(index)
        node = self.health.lost(lost)
        kill_actors([lost])
        return f"{why} (node {node or 'unknown'})"

    def _add_replacement(self, index: int, cause: str) -> None:
        """A new worker at ``index``, holding the current weights (see ``_replace``)."""
        r = self.cfg.rollout
        needs = {"CPU": r.num_cpus_per_worker, "GPU": r.num_gpus_per_worker}
        for _ in range(MAX_TRIES):
            self.restarts += 1
            self.health.record(f"rollout worker {index}", cause)
            strategy = self.health.strategy(needs)
            try:
                self.grow(1, strategy)
                break
            except (
                ray.exceptions.RayActorError,
                ray.exceptions.GetTimeoutError,
                WeightSyncError,
            ) as exc:
                cause = f"had its replacement die before it was ready ({type(exc).__name__})"
            except PlacementTimeoutError:
                cause = unplaced(self.health, strategy)
        else:
            raise RuntimeError(
                f"rollout worker {index}: {MAX_TRIES} replacements in a row died before they "
                "were ready or were not placed in time"
            )
        self.workers.insert(index, self.workers.pop())

    def kill(self) -> None:
        kill_actors(self.workers)
        self.workers.clear()
