"""RayWorkers: the worker classes as named Ray actors, satisfying ``workers.Workers``.

Each phase submits every call first and then waits once (``get_all``, which fails as soon as
one call fails, and waits at most ``train.phase_timeout_s``). The weight sync streams buckets
(``sync.bucket_mb``): the learner ranks gather bucket k+1 while the rollout workers load bucket
k, so no process holds more than about two buckets beyond its model. A rollout worker or scorer
that dies or does not answer in time is replaced and its work redone; a learner rank that does
is reported as a ``LearnerLostError`` naming it and the phase, and ``restart_learners`` rebuilds
both groups. Rollout workers and scorers are spread over the nodes (``cluster.spread``); the
reference and reward scorers run as ``num_replicas`` data-parallel replicas that split each
batch. Learner groups live in placement groups; every actor and group is named, in the run's
namespace (``cluster.namespace``, default ``rlhf_ray``): ``policy-0``, ``value-0``,
``reference-0``, ``reward-0``, ``rollout-0`` ... A critic-free estimator (``algo.estimator``
other than gae) starts no value group: no ``value-*`` actor, placement group, checkpoint or
resume state.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlhf_ray.accelerator import actor_env
from rlhf_ray.config import (
    Config,
    ModelSpec,
    TokenizerConfig,
    has_critic,
    optimizer_steps,
    policy_optimizer_steps,
    policy_tokenizer,
    value_init_spec,
)
from rlhf_ray.distributed.cluster import cluster_nodes
from rlhf_ray.distributed.plan import format_plan, resource_plan, shortfalls
from rlhf_ray.distributed.replacement import MAX_TRIES, NodeHealth
from rlhf_ray.errors import UserError
from rlhf_ray.stage_config import EvalConfig
from rlhf_ray.types import PPOBatch, PromptBatch, Rollout
from rlhf_ray.workers.interface import (
    LearnerLostError,
    mean_stats,
    round_seed,
    shard_rows,
    split_rows,
)
from rlhf_ray.workers.learners import PolicyLearner, ValueLearner
from rlhf_ray.workers.scorers import ReferenceScorer, RewardScorer
from rlhf_ray.workers.sync import stream_buckets
from rlhf_ray.workers.vllm_rollout import generator_class


def _threads(cpus: float) -> int:
    """Never more torch threads than the actor's CPU share (measured: 2 actors x 2 threads on 2 cores ran ~5x slower)."""
    return max(1, int(cpus))


def _env(cpus: float, gpus: float) -> dict[str, Any]:
    env: dict[str, str] = actor_env(gpus)  # the accelerator, explicit (rlhf_ray/accelerator.py)
    env["OMP_NUM_THREADS"] = str(_threads(cpus))
    return {"env_vars": env}


def kill_actors(handles: list[Any], timeout_s: float = 30.0) -> None:
    """Kill actors and wait until Ray has released them (and so their names)."""
    for h in handles:
        ray.kill(h)
    deadline = time.monotonic() + timeout_s
    for h in handles:
        ping, patience = h.ping.remote(), time.monotonic() + 5.0
        while time.monotonic() < min(deadline, patience):
            try:  # every ping is fetched: one dropped unfetched is printed as an unhandled
                ray.get(ping, timeout=1)  # "killed by ray.kill" error when Ray collects it
            except ray.exceptions.GetTimeoutError:
                continue  # the same ping, waited on again (an unreachable actor: 5 s at most)
            except ray.exceptions.RayActorError:
                break  # dead (or unreachable, ActorUnavailableError is a RayActorError)
            time.sleep(0.1)  # answered before the kill took effect: ask again
            ping = h.ping.remote()


def check_namespace_free() -> None:
    """Actor names are unique per namespace: say so clearly if another run holds them."""
    try:
        ray.get_actor("policy-0")
    except ValueError:
        return
    namespace = ray.get_runtime_context().namespace
    raise UserError(
        f"another run's actors (policy-0, ...) are alive in Ray namespace {namespace!r} of this "
        "cluster: wait for that run to end, or give this one its own cluster.namespace"
    )


class PhaseTimeoutError(UserError):
    """Some actors of a phase did not answer within ``train.phase_timeout_s``."""


def _is_learner(name: str) -> bool:
    return name.startswith(("policy-", "value-"))


def get_all(
    refs: list[Any],
    names: list[str] | None = None,
    phase: str = "",
    timeout_s: float | None = None,
    on_timeout: Callable[[list[str]], bool] | None = None,
    resubmit: Callable[[str], Any] | None = None,
) -> list[Any]:
    """``ray.get`` of one phase that fails as soon as any call fails: the peers of a dead
    learner rank would otherwise be waited on until the collective timeout.

    Waits at most ``timeout_s`` (between answers of a late actor's restarts): past it,
    ``on_timeout(late names)`` may restart them and return True to wait again; otherwise a
    late learner raises ``LearnerLostError``, anything else ``PhaseTimeoutError``. A dead
    learner (``names`` given) raises ``LearnerLostError`` naming it and the phase; the call of
    another dead or unreachable actor is sent again if ``resubmit(name)`` gives a new ref."""
    refs = list(refs)
    label = dict(zip(refs, names or [""] * len(refs), strict=True))
    slot = {r: i for i, r in enumerate(refs)}
    pending = list(refs)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while pending:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, pending = ray.wait(pending, num_returns=1, timeout=left)
        if not ready:
            late = [label[r] for r in pending]
            if on_timeout is not None and on_timeout(late):
                deadline = time.monotonic() + (timeout_s or 0.0)
                continue
            _raise_late(late, phase, timeout_s)
        try:
            ray.get(ready)
        except ray.exceptions.RayActorError:  # also ActorUnavailableError (a lost node)
            name = label[ready[0]]
            if _is_learner(name):
                raise LearnerLostError(f"learner {name} died during {phase}") from None
            again = resubmit(name) if resubmit is not None else None
            if again is None:
                raise
            refs[slot[ready[0]]] = again
            label[again], slot[again] = name, slot[ready[0]]
            pending.append(again)
    return ray.get(refs)


def _score_call(scorer: Any, name: str, rows_ref: Any) -> Any:
    """A scorer replica's call on its rows: the reference's log-probs or the reward's scores
    (``scores`` and its parts, ``RewardScorer.score_parts``)."""
    if name.startswith("reference-"):
        return scorer.logprobs.remote(rows_ref)
    return scorer.score_parts.remote(rows_ref)


def _raise_late(late: list[str], phase: str, timeout_s: float | None) -> None:
    named = ", ".join(n or "an actor" for n in late)
    message = (f"{named} did not answer within train.phase_timeout_s={timeout_s:g}s "
               f"during {phase}")  # fmt: skip
    if any(_is_learner(n) for n in late):
        raise LearnerLostError(message)
    raise PhaseTimeoutError(message)


def wait_ready(handles: dict[str, Any], timeout_s: float) -> None:
    """Wait until every named actor answers ``ping``; a clear error if some stay pending."""
    refs = {h.ping.remote(): name for name, h in handles.items()}
    ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    ray.get(ready)  # surface constructor errors
    if pending:
        names = ", ".join(refs[r] for r in pending)
        raise UserError(
            f"actors still pending after {timeout_s:g}s (cluster.actor_start_timeout_s): {names}. "
            "The cluster cannot schedule them; check `rlhf-ray plan` and the Ray dashboard."
        )


def spawn_actor(
    cls: type, name: str, cpus: float, gpus: float, *args: Any, restarts: int = 0,
    strategy: Any = None, **kwargs: Any,
) -> Any:  # fmt: skip
    """A named actor of ``cls`` with its resources and at most its CPU share of threads;
    ``restarts`` > 0 lets Ray restart it and retry its calls (stateless scorers only);
    ``strategy`` places it (a placement-group bundle)."""
    return (
        ray.remote(cls)
        .options(name=name, num_cpus=cpus, num_gpus=gpus, runtime_env=_env(cpus, gpus),
                 max_restarts=restarts, max_task_retries=restarts, scheduling_strategy=strategy)
        .remote(*args, num_threads=_threads(cpus), **kwargs)
    )  # fmt: skip


@ray.remote(num_cpus=0)
def _rendezvous_address() -> tuple[str, int]:
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return ray.util.get_node_ip_address(), port


class LearnerGroup:
    """``num_ranks`` learner actors in one placement group, joined by torch.distributed."""

    def __init__(
        self, role: str, cls: type, role_cfg, timeout_s: float, dist_timeout_s: int,
        resources: dict[str, float] | None = None, **kwargs: Any,
    ):  # fmt: skip
        n, cpus, gpus = role_cfg.num_ranks, role_cfg.num_cpus_per_rank, role_cfg.num_gpus_per_rank
        bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {}), **(resources or {})}
        # all ranks on one node: a soft PACK silently spans nodes and runs NCCL over TCP
        self.pg = placement_group([bundle] * n, strategy="STRICT_PACK", name=f"rlhf_ray-{role}")
        if not self.pg.wait(timeout_seconds=int(timeout_s)):
            remove_placement_group(self.pg)
            raise UserError(
                f"the {role} placement group ({n} x {bundle}) could not be placed on one node "
                f"within {timeout_s:g}s: a learner group's ranks share a node (STRICT_PACK), so "
                f"one node needs {n * cpus:g} CPUs and {n * gpus:g} GPUs free; lower "
                f"{role}.num_ranks or use larger nodes (`rlhf-ray plan` checks this)"
            )
        self.actors = [
            spawn_actor(cls, f"{role}-{rank}", cpus, gpus, rank=rank, world_size=n,
                   strategy=PlacementGroupSchedulingStrategy(self.pg, rank), **kwargs)
            for rank in range(n)
        ]  # fmt: skip
        self.handles = {f"{role}-{r}": a for r, a in enumerate(self.actors)}
        self.names = list(self.handles)
        self.role, self.cfg, self.dist_timeout_s = role, role_cfg, dist_timeout_s
        self._alive = True

    def start(self) -> list[Any]:
        """Rendezvous then build engines; returns the refs of each rank's (local, total) params."""
        strategy = PlacementGroupSchedulingStrategy(self.pg, 0)
        addr, port = ray.get(_rendezvous_address.options(scheduling_strategy=strategy).remote())
        backend = "nccl" if self.cfg.num_gpus_per_rank else "gloo"
        get_all(self.call("init_process_group", addr, port, self.dist_timeout_s, backend),
                 self.names, "rendezvous")  # fmt: skip
        return [a.setup.remote() for a in self.actors]

    def call(self, method: str, *args: Any) -> list[Any]:
        return [getattr(a, method).remote(*args) for a in self.actors]

    def kill(self) -> None:
        if self._alive:
            self._alive = False
            kill_actors(self.actors)
            remove_placement_group(self.pg)


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

    def _spawn(self, strategy: Any = None) -> tuple[str, Any]:
        r = self.cfg.rollout
        name = f"{self.prefix}-{self._next_id}"
        handle = spawn_actor(
            generator_class(r), name, r.num_cpus_per_worker, r.num_gpus_per_worker,
            self.model_spec, self.tokenizer_cfg, r, worker_id=self._next_id,
            strategy=strategy or spread_strategy(self.cfg), from_sync=self.from_sync,
        )  # fmt: skip
        self._next_id += 1
        return name, handle

    def grow(self, n: int, strategy: Any = None) -> None:
        """Add ``n`` workers, ready and holding the current weights; none if they cannot start
        (the nodes of those that died meanwhile are avoided from then on)."""
        new = dict(self._spawn(strategy) for _ in range(n))
        try:
            wait_ready(new, self.cfg.cluster.actor_start_timeout_s)
            ray.get([w.load_bucket.remote(ref, self._version, k, self._count)
                     for w in new.values() for k, ref in enumerate(self._buckets)])  # fmt: skip
        except BaseException as exc:
            if isinstance(exc, ray.exceptions.RayActorError):
                for handle in new.values():
                    self.health.lost(handle)
            kill_actors(list(new.values()))
            raise
        self.workers.extend(new.values())

    def shrink(self, n: int) -> None:
        """Remove workers beyond the first ``n`` (between rounds: they hold no work)."""
        extra = self.workers[n:]
        del self.workers[n:]
        kill_actors(extra)

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
        placed on a healthy node (``distributed/replacement.py``), and replaced in turn if it
        dies before it is ready, at most ``MAX_TRIES`` times."""
        if self.restarts >= 10 * len(self.workers):
            raise RuntimeError(f"rollout workers keep failing ({self.restarts} replaced)")
        lost = self.workers.pop(index)
        node = self.health.lost(lost)
        kill_actors([lost])
        cause = f"{why} (node {node or 'unknown'})"
        for _ in range(MAX_TRIES):
            self.restarts += 1
            self.health.record(f"rollout worker {index}", cause)
            try:
                self.grow(1, self.health.strategy(self.cfg.rollout.num_cpus_per_worker))
                break
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
                cause = f"its replacement died before it was ready ({type(exc).__name__})"
        else:
            raise RuntimeError(
                f"rollout worker {index}: {MAX_TRIES} replacements in a row died before they "
                "were ready"
            )
        self.workers.insert(index, self.workers.pop())

    def kill(self) -> None:
        kill_actors(self.workers)
        self.workers.clear()


def spread_strategy(cfg: Config | EvalConfig) -> str | None:
    """Rollout workers and scorers spread over nodes: a lost node takes few of them."""
    return "SPREAD" if cfg.cluster.spread else None


class RayWorkers:
    """Every role as Ray actors; the driver's ``Workers``."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        plan = resource_plan(cfg)
        nodes = cluster_nodes()
        problems = shortfalls(plan, nodes)
        if problems:
            raise UserError(
                "the run does not fit the cluster: "
                + "; ".join(problems)
                + ".\n"
                + format_plan(plan, nodes)
            )
        check_namespace_free()
        self.pool = RolloutPool(cfg)
        self.learner_restarts = 0
        self.scorer_restarts = 0
        self._cleanup: list[Callable[[], None]] = [self.pool.kill]  # undone in reverse
        try:
            self._start(cfg)
        except BaseException:
            self.close()  # leave nothing pending or half-started behind
            raise

    def _make_learners(self, cfg: Config) -> None:
        timeout = cfg.cluster.actor_start_timeout_s
        dist_timeout = cfg.train.dist_timeout_s
        tok, ppo, seed, bad = (
            policy_tokenizer(cfg),
            cfg.ppo,
            cfg.train.seed,
            cfg.train.max_bad_steps,
        )
        pinned = cfg.cluster.learner_resources
        self.policy = LearnerGroup(
            "policy", PolicyLearner, cfg.policy, timeout, dist_timeout, pinned,
            policy_cfg=cfg.policy, ppo_cfg=ppo, tokenizer_cfg=tok,
            temperature=cfg.rollout.temperature, seed=seed, max_bad_steps=bad,
            top_k=cfg.rollout.top_k, top_p=cfg.rollout.top_p,
            total_steps=policy_optimizer_steps(cfg),
        )  # fmt: skip
        self.value: LearnerGroup | None = None
        if has_critic(cfg):  # a critic-free estimator has no value group
            self.value = LearnerGroup(
                "value", ValueLearner, cfg.value, timeout, dist_timeout, pinned,
                value_cfg=cfg.value, ppo_cfg=ppo, tokenizer_cfg=tok, seed=seed,
                model_spec=value_init_spec(cfg), max_bad_steps=bad,
                total_steps=optimizer_steps(cfg),
            )  # fmt: skip
        self.learners = [g for g in (self.policy, self.value) if g is not None]

    def _start_learners(self) -> None:
        """Rendezvous and build the engines of every learner group (their actors must be
        alive)."""
        counts = get_all([r for g in self.learners for r in g.start()],
                          [n for g in self.learners for n in g.names], "setup")  # fmt: skip
        self.param_counts = {}
        for group in self.learners:
            self.param_counts[group.role] = counts[: group.cfg.num_ranks]
            counts = counts[group.cfg.num_ranks :]
        for role, per_rank in self.param_counts.items():
            held = ", ".join(f"rank {r}: {loc:,}/{tot:,}" for r, (loc, tot) in enumerate(per_rank))
            print(f"[rlhf_ray] {role} parameters held per rank ({held})", flush=True)

    def _start(self, cfg: Config) -> None:
        timeout = cfg.cluster.actor_start_timeout_s
        self._cleanup.append(self._kill_learners)
        self._make_learners(cfg)
        ref, rew = cfg.reference, cfg.reward
        # The scorers are frozen and their calls pure, and a restart rebuilds the same model
        # (the reference from the policy's own deterministic spec), so Ray may restart them and
        # retry the interrupted call.
        self.scorers: dict[str, Any] = {}  # reference-<i> and reward-<i>, by name
        self._cleanup.append(lambda: kill_actors(list(self.scorers.values())))
        for name in [f"reference-{i}" for i in range(ref.num_replicas)] + [
            f"reward-{i}" for i in range(rew.num_replicas)
        ]:
            self.scorers[name] = self._scorer(name, spread_strategy(cfg))
        self.pool.grow(cfg.rollout.num_workers)  # the other actors start meanwhile
        others = dict(self.scorers)
        for group in self.learners:
            others.update(group.handles)
        wait_ready(others, timeout)
        self._start_learners()
        counts = self.policy.call("num_weight_buckets", cfg.sync.bucket_mb)
        self._num_buckets = self._learners("sync", counts)[0]
        if ref.model is None:  # the reference starts as a copy of the policy, bucket by bucket
            references = [h for n, h in self.scorers.items() if n.startswith("reference-")]

            def load(bucket: Any, index: int) -> None:
                get_all([r.load_bucket.remote(bucket) for r in references])

            stream_buckets(self._num_buckets, self._gather_bucket, load)

    def _scorer(self, name: str, strategy: Any) -> Any:
        """The scorer replica ``name`` (``reference-<i>`` or ``reward-<i>``), placed by
        ``strategy``."""
        cfg, tok = self.cfg, policy_tokenizer(self.cfg)
        if name.startswith("reference-"):
            ref = cfg.reference
            return spawn_actor(
                ReferenceScorer, name, ref.num_cpus, ref.num_gpus,
                ref.model or cfg.policy.model, tok, cfg.rollout.temperature,
                chunk_size=ref.score_micro_batch_size, restarts=3, strategy=strategy,
            )  # fmt: skip
        rew = cfg.reward
        return spawn_actor(
            RewardScorer, name, rew.num_cpus, rew.num_gpus, rew, tok,
            search_path=[os.getcwd()], chunk_size=rew.score_micro_batch_size, restarts=3,
            strategy=strategy,
        )  # fmt: skip

    def _gather_bucket(self, index: int) -> Any:
        """Submit the gather of one bucket on every policy rank (a collective under ZeRO-3);
        returns a handle whose ``wait`` gives rank 0's ref: the bucket stays in the object
        store, the driver never fetches it."""
        refs = self.policy.call("weight_bucket", index, self.cfg.sync.bucket_mb)
        timeout = self.cfg.train.phase_timeout_s

        def wait() -> Any:
            get_all(refs[1:], self.policy.names[1:], "sync", timeout)  # they return None
            ready, _ = ray.wait(refs[:1], fetch_local=False, timeout=timeout)
            # rank 0's answer is left unfetched: a cheap call tells whether rank 0 is alive
            get_all([self.policy.actors[0].ping.remote()], self.policy.names[:1], "sync",
                     timeout)  # fmt: skip
            if not ready:
                _raise_late(self.policy.names[:1], "sync", timeout)
            return refs[0]

        return wait

    def _kill_learners(self) -> None:
        for role in ("value", "policy"):
            group = getattr(self, role, None)
            if group is not None:
                group.kill()

    def restart_learners(self) -> None:
        """Kill both learner groups and start them again (fresh weights: the caller restores
        a checkpoint). Rollout workers and scorers keep running."""
        self.learner_restarts += 1
        print(f"[rlhf_ray] restarting the learner groups ({self.learner_restarts})", flush=True)
        cause = "a learner rank was lost"
        for _ in range(MAX_TRIES):  # a group placed on a dying node is itself replaced
            self.pool.health.record("the learner groups", cause)
            self._kill_learners()
            try:
                self._make_learners(self.cfg)
                handles = {n: h for g in self.learners for n, h in g.handles.items()}
                wait_ready(handles, self.cfg.cluster.actor_start_timeout_s)
                self._start_learners()
                return
            except (ray.exceptions.RayActorError, LearnerLostError) as exc:
                cause = f"a restarted rank died before it was ready ({type(exc).__name__})"
        raise LearnerLostError(f"the learner groups died {MAX_TRIES} times while starting")

    def _learners(self, phase: str, refs: list[Any]) -> list[Any]:
        """Wait for one call per learner rank (policy ranks first, then any value ranks)."""
        names = [n for g in self.learners for n in g.names][: len(refs)]
        return get_all(refs, names, phase, self.cfg.train.phase_timeout_s)

    def _restart_late_scorers(self, late: list[str]) -> bool:
        """Past the phase timeout: a late scorer is killed and Ray restarts it and retries its
        call (frozen and pure, see ``_start``); a late learner cannot be helped here."""
        handles = self.scorers
        if not late or any(n not in handles for n in late) or self.scorer_restarts >= 3:
            return False
        for name in late:
            print(f"[rlhf_ray] {name} did not answer within train.phase_timeout_s; restarting "
                  "it and retrying its call", flush=True)  # fmt: skip
            self.scorer_restarts += 1
            ray.kill(handles[name], no_restart=False)
        return True

    def _retry_scorer(self, name: str, parts: dict[str, Any]) -> Any:
        """The call of a scorer that died or became unreachable (its node was lost) beyond
        Ray's own retries, on its rows ``parts[name]``: a fresh replica (the same frozen model)
        on a healthy node takes it; one that dies too is replaced in turn. None when they keep
        failing."""
        if self.scorer_restarts >= 10:
            return None
        self.scorer_restarts += 1
        old = self.scorers[name]
        node = self.pool.health.lost(old)
        cause = f"lost during score (node {node or 'unknown'}); its rows are scored again"
        self.pool.health.record(name, cause)
        kill_actors([old])
        role = self.cfg.reference if name.startswith("reference-") else self.cfg.reward
        for _ in range(10):  # Ray may take a moment to release the dead actor's name
            try:
                self.scorers[name] = self._scorer(name, self.pool.health.strategy(role.num_cpus))
                break
            except ValueError:
                time.sleep(1.0)
        return _score_call(self.scorers[name], name, parts[name])

    # -- Workers ------------------------------------------------------------------------------

    def sync(self, version: int) -> None:
        """Stream the policy's weights to every rollout worker as ``version``, one bucket at a
        time: the gather of bucket k+1 overlaps the workers' loading of bucket k."""
        self.pool.begin(version, self._num_buckets)
        stream_buckets(self._num_buckets, self._gather_bucket, self.pool.load_bucket)

    def scale_rollout(self, num_workers: int) -> None:
        current = len(self.pool.workers)
        if num_workers < current:
            self.pool.shrink(num_workers)
        elif num_workers > current:
            try:  # new workers get the current weights before they generate
                self.pool.grow(num_workers - current)
            except UserError as exc:  # keep running on the pool we have
                print(f"[rlhf_ray] could not grow the rollout pool: {exc}", flush=True)
                return
        if num_workers != current:
            print(
                f"[rlhf_ray] rollout pool: {current} -> {len(self.pool.workers)} workers",
                flush=True,
            )

    def generate(self, prompts: PromptBatch, round_index: int, version: int) -> Rollout:
        return Rollout.concat(self.pool.generate(prompts, round_index, version))

    def score(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """All four scorings at once; each scorer role's replicas split the rows."""
        ref = ray.put(rollout)
        n_pol = self.cfg.policy.num_ranks
        parts: dict[str, Any] = {}  # each scorer's rows, in the object store
        for role in ("reference", "reward"):
            names = [n for n in self.scorers if n.startswith(f"{role}-")]
            for name, rows in zip(names, split_rows(len(rollout), len(names)), strict=True):
                parts[name] = ray.put(rollout.select(rows))
        refs = (
            [_score_call(self.scorers[n], n, parts[n]) for n in self.scorers]
            + self.policy.call("old_logprobs", ref)
            + (self.value.call("values", ref) if self.value else [])
        )
        names = [*self.scorers, *(n for g in self.learners for n in g.names)]
        out = get_all(
            refs, names, "score", self.cfg.train.phase_timeout_s, self._restart_late_scorers,
            lambda name: self._retry_scorer(name, parts),
        )  # fmt: skip
        n_ref = sum(n.startswith("reference-") for n in self.scorers)
        ranks, rewards = out[len(self.scorers) :], out[n_ref : len(self.scorers)]
        return {
            "ref_logprobs": torch.cat(out[:n_ref]),
            **{k: torch.cat([r[k] for r in rewards]) for k in rewards[0]},  # scores, parts
            **{k: torch.cat([r[k] for r in ranks[:n_pol]]) for k in ranks[0]},  # old_logprobs ...
            **({"values": torch.cat(ranks[n_pol:])} if self.value else {}),
        }

    def update(self, batch: PPOBatch, round_index: int) -> dict[str, float]:
        ref = ray.put(batch)
        stats = self._learners(
            "update", [r for g in self.learners for r in g.call("train", ref, round_index)]
        )
        merged: dict[str, float] = {}
        for group in self.learners:
            merged |= mean_stats(stats[: group.cfg.num_ranks])
            stats = stats[group.cfg.num_ranks :]
        return merged

    def probe_sync(self, version: int) -> tuple[float, int]:
        worker = self.pool.workers[version % len(self.pool.workers)]
        refs = self.policy.call("probe_logprobs") + [worker.probe_logprobs.remote(),
                                                     worker.ping.remote()]  # fmt: skip
        learner, *_, sampled, worker_id = get_all(refs)
        return float((learner - sampled).abs().max()), worker_id

    def info(self) -> dict[str, float]:
        return {"rollout/num_workers": len(self.pool.workers),
                "rollout/worker_restarts": self.pool.restarts,
                "train/learner_restarts": self.learner_restarts,
                "train/scorer_restarts": self.scorer_restarts,
                "recovery/replacements": self.pool.health.replacements}  # fmt: skip

    def save(self, directory: Path) -> None:
        self._on_learners("save", directory)

    def save_state(self, directory: Path) -> None:
        self._on_learners("save_state", directory, "_state")

    def load_state(self, directory: Path) -> None:
        self._on_learners("load_state", directory, "_state")

    def _on_learners(self, method: str, directory: Path, suffix: str = "") -> None:
        """``method(directory/<role><suffix>)`` on every rank of every learner group."""
        refs = [
            r for g in self.learners for r in g.call(method, str(directory / (g.role + suffix)))
        ]
        self._learners(method, refs)

    def close(self) -> None:
        while self._cleanup:
            self._cleanup.pop()()
