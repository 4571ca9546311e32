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

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import torch

from rlhf_ray.config.ppo import (
    Config,
    has_critic,
    optimizer_steps,
    policy_optimizer_steps,
    policy_tokenizer,
    sync_backend,
    sync_transport,
    trains_lora,
    value_init_spec,
)
from rlhf_ray.distributed.actors import (
    PlacementTimeoutError,
    check_namespace_free,
    get_all,
    kill_actors,
    raise_late,
    spread_strategy,
    wait_ready,
)
from rlhf_ray.distributed.cluster import cluster_hosts, cluster_nodes
from rlhf_ray.distributed.learner_group import LearnerGroup, join_groups
from rlhf_ray.distributed.plan import format_plan, resource_plan, shortfalls
from rlhf_ray.distributed.replacement import MAX_TRIES, actor_restarts, unplaced
from rlhf_ray.distributed.rollout_pool import RolloutPool
from rlhf_ray.distributed.scorer_actors import (
    SCORER_RESTARTS,
    score_call,
    scorer_needs,
    spawn_scorer,
)
from rlhf_ray.distributed.threads import PhaseThreadPlanner
from rlhf_ray.distributed.weight_transport import CollectiveSender
from rlhf_ray.errors import UserError
from rlhf_ray.types import PPOBatch, PromptBatch, Rollout
from rlhf_ray.workers.interface import (
    LearnerLostError,
    mean_stats,
    split_rows,
    sync_bytes,
)
from rlhf_ray.workers.learners import PolicyLearner, ValueLearner
from rlhf_ray.workers.sync import stream_buckets


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
        self.pool.resync = lambda: self.sync(self.pool.version)  # for lost weight buckets
        self.transport = sync_transport(cfg, cluster_hosts())  # object_store or collective
        self.last_sync: dict[str, float] = {}  # sync/seconds of the latest sync (bytes: info)
        self.learner_restarts = 0
        self.scorer_restarts = 0
        self._ray_restarts: dict[str, int] = {}  # scorer actor id -> Ray's restarts counted
        self.threads = PhaseThreadPlanner(cfg, self._role_actors)  # per phase, on CPU nodes
        self._cleanup: list[Callable[[], None]] = [
            self.threads.collect,
            self.pool.kill,
        ]  # in reverse
        try:
            self._start(cfg)
        except BaseException:
            self.close()  # leave nothing pending or half-started behind
            raise

    def _make_learners(self, cfg: Config, avoid: list[str] | None = None) -> None:
        """Both learner groups, off the nodes ``avoid`` (a restart) where they fit."""
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
            "policy",
            PolicyLearner,
            cfg.policy,
            timeout,
            dist_timeout,
            pinned,
            avoid,
            policy_cfg=cfg.policy,
            ppo_cfg=ppo,
            tokenizer_cfg=tok,
            temperature=cfg.rollout.temperature,
            seed=seed,
            max_bad_steps=bad,
            top_k=cfg.rollout.top_k,
            top_p=cfg.rollout.top_p,
            total_steps=policy_optimizer_steps(cfg),
            reference_from_base=cfg.reference.from_policy_base,
        )
        self.value: LearnerGroup | None = None
        if has_critic(cfg):  # a critic-free estimator has no value group
            self.value = LearnerGroup(
                "value",
                ValueLearner,
                cfg.value,
                timeout,
                dist_timeout,
                pinned,
                avoid,
                value_cfg=cfg.value,
                ppo_cfg=ppo,
                tokenizer_cfg=tok,
                seed=seed,
                model_spec=value_init_spec(cfg),
                max_bad_steps=bad,
                total_steps=optimizer_steps(cfg),
            )
        self.learners = [g for g in (self.policy, self.value) if g is not None]

    def _start_learners(self) -> None:
        """Rendezvous and build the engines of every learner group (their actors must be
        alive)."""
        join_groups(self.learners)  # every group's rendezvous at once
        counts = get_all(
            [r for g in self.learners for r in g.call("setup")],
            [n for g in self.learners for n in g.names],
            "setup",
        )
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
        references = 0 if ref.from_policy_base else ref.num_replicas  # (else: the policy's)
        for name in [f"reference-{i}" for i in range(references)] + [
            f"reward-{i}" for i in range(rew.num_replicas)
        ]:
            self.scorers[name] = spawn_scorer(cfg, name, spread_strategy(cfg))
        self.pool.grow(cfg.rollout.num_workers)  # the other actors start meanwhile
        others = dict(self.scorers)
        for group in self.learners:
            others.update(group.handles)
        wait_ready(others, timeout)
        self._start_learners()
        counts = self.policy.call("num_weight_buckets", cfg.sync.bucket_mb)
        self._num_buckets = self._learners("sync", counts)[0]
        # (the same every sync: the adapters alone with LoRA, else every weight)
        self._sync_bytes = self._learners("sync", self.policy.call("sync_nbytes"))[0]
        if self.transport == "collective":
            self.pool.sender = CollectiveSender(
                lambda: self.policy,
                cfg.sync.bucket_mb,
                cfg.train.phase_timeout_s,
                sync_backend(cfg),
                cfg.sync.shared_memory,
            )
        # the reference starts as a copy of the policy, bucket by bucket; a LoRA policy's
        # initial model is the one its spec describes, which the reference built itself
        lora = trains_lora(cfg.policy.lora, cfg.policy.model)
        if ref.model is None and references and not lora:
            references = [h for n, h in self.scorers.items() if n.startswith("reference-")]

            def load(bucket: Any, index: int) -> None:
                get_all([r.load_bucket.remote(bucket) for r in references])

            stream_buckets(self._num_buckets, self._gather_bucket, load)

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
            get_all([self.policy.actors[0].ping.remote()], self.policy.names[:1], "sync", timeout)
            if not ready:
                raise_late(self.policy.names[:1], "sync", timeout)
            return refs[0]

        return wait

    def _role_actors(self, role: str) -> list[Any]:
        """The live actors of ``role`` (a role of ``plan.resource_plan``)."""
        if role == "rollout":
            return list(self.pool.workers)
        if role in ("policy", "value"):
            group = getattr(self, role, None)
            return group.actors if group is not None else []
        return [h for n, h in self.scorers.items() if n.startswith(f"{role}-")]

    def _kill_learners(self) -> None:
        for role in ("value", "policy"):
            group = getattr(self, role, None)
            if group is not None:
                group.kill()

    def restart_learners(self) -> None:
        """Kill both learner groups and start them again (fresh weights: the caller restores
        a checkpoint), off the nodes of their dead ranks and nodes that miss a heartbeat.
        Rollout workers and scorers keep running."""
        self.learner_restarts += 1
        print(f"[rlhf_ray] restarting the learner groups ({self.learner_restarts})", flush=True)
        health = self.pool.health
        dead = health.lost_dead([a for g in self.learners for a in g.actors])
        cause = f"lost a rank (node {', '.join(dead) or 'unknown'})"
        for _ in range(MAX_TRIES):  # a group placed on a dying node is itself replaced
            health.record("the learner groups", cause)
            self._kill_learners()
            try:
                self._make_learners(self.cfg, health.avoid())
                handles = {n: h for g in self.learners for n, h in g.handles.items()}
                wait_ready(handles, self.cfg.cluster.actor_start_timeout_s)
                self._start_learners()
                return
            except (ray.exceptions.RayActorError, LearnerLostError) as exc:
                health.lost_dead([a for g in self.learners for a in g.actors])
                cause = f"had a restarted rank die before it was ready ({type(exc).__name__})"
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
            print(
                f"[rlhf_ray] {name} did not answer within train.phase_timeout_s; restarting "
                "it and retrying its call",
                flush=True,
            )
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
        health, old = self.pool.health, self.scorers[name]
        node = health.lost(old)
        cause = f"was lost during score (node {node or 'unknown'}); its rows are scored again"
        for _ in range(MAX_TRIES):  # a replica that dies before it is ready is replaced too
            self.scorer_restarts += 1
            health.record(name, cause)
            kill_actors([old])
            strategy = health.strategy(scorer_needs(self.cfg, name))
            old = self.scorers[name] = self._respawn_scorer(name, strategy)
            try:
                wait_ready({name: old}, self.cfg.cluster.actor_start_timeout_s)
                return score_call(old, name, parts[name])
            except ray.exceptions.RayActorError as exc:
                health.lost(old)
                cause = f"had its replacement die before it was ready ({type(exc).__name__})"
            except PlacementTimeoutError:  # its node has no room now: the next try elsewhere
                cause = unplaced(health, strategy)
        raise RuntimeError(
            f"{name}: {MAX_TRIES} replacements in a row died before they were ready or were "
            "not placed in time"
        )

    def _respawn_scorer(self, name: str, strategy: Any) -> Any:
        """A fresh replica ``name`` placed by ``strategy`` (``distributed/replacement.py``)."""
        for _ in range(9):  # Ray may take a moment to release the dead actor's name
            try:
                return spawn_scorer(self.cfg, name, strategy)
            except ValueError:
                time.sleep(1.0)
        return spawn_scorer(self.cfg, name, strategy)

    def _count_ray_restarts(self) -> None:
        """Ray restarts a scorer itself (``max_restarts``) when its process or node is lost:
        each such restart is a replacement too, counted and named in the log."""
        for name, handle in self.scorers.items():
            key, done = handle._actor_id.hex(), actor_restarts(handle)
            for k in range(self._ray_restarts.get(key, 0) + 1, done + 1):
                cause = f"was restarted by Ray (restart {k} of {SCORER_RESTARTS})"
                self.pool.health.record(name, cause, "its process or node was lost")
            self._ray_restarts[key] = max(done, self._ray_restarts.get(key, 0))

    # -- Workers ------------------------------------------------------------------------------

    def sync(self, version: int) -> None:
        """Stream the policy's weights to every rollout worker as ``version``, one bucket at a
        time: the gather of bucket k+1 overlaps the workers' loading of bucket k. Through the
        object store, or broadcast over the sync group (``sync.transport``)."""
        start = time.perf_counter()
        self.threads.before("policy", "rollout")  # both copy at once: one core each here
        if self.transport == "collective":
            self.pool.sync_collective(version, self._num_buckets)
        else:
            self.pool.begin(version, self._num_buckets)
            stream_buckets(self._num_buckets, self._gather_bucket, self.pool.load_bucket)
        self.last_sync = {
            "sync/seconds": time.perf_counter() - start,
        }

    def scale_rollout(self, num_workers: int) -> None:
        current = len(self.pool.workers)
        if num_workers < current:
            self.pool.shrink(num_workers)
        elif num_workers > current:
            try:  # new workers get the current weights before they generate
                self.pool.grow(num_workers - current)
            except (UserError, ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
                # keep running on the pool we have
                print(f"[rlhf_ray] could not grow the rollout pool: {exc}", flush=True)
                return
        if num_workers != current:
            print(
                f"[rlhf_ray] rollout pool: {current} -> {len(self.pool.workers)} workers",
                flush=True,
            )

    def generate(self, prompts: PromptBatch, round_index: int, version: int) -> Rollout:
        self.threads.before("rollout")
        return Rollout.concat(self.pool.generate(prompts, round_index, version))

    def score(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """All four scorings at once; each scorer role's replicas split the rows."""
        self.threads.before("reference", "reward", "policy", "value")
        ref = ray.put(rollout)
        n_pol = self.cfg.policy.num_ranks
        parts: dict[str, Any] = {}  # each scorer's rows, in the object store
        for role in ("reference", "reward"):
            names = [n for n in self.scorers if n.startswith(f"{role}-")]
            if not names:  # reference.from_policy_base: no reference actor to split rows for
                continue
            for name, rows in zip(names, split_rows(len(rollout), len(names)), strict=True):
                parts[name] = ray.put(rollout.select(rows))
        refs = (
            [score_call(self.scorers[n], n, parts[n]) for n in self.scorers]
            + self.policy.call("old_logprobs", ref)
            + (self.value.call("values", ref) if self.value else [])
        )
        names = [*self.scorers, *(n for g in self.learners for n in g.names)]
        out = get_all(
            refs,
            names,
            "score",
            self.cfg.train.phase_timeout_s,
            self._restart_late_scorers,
            lambda name: self._retry_scorer(name, parts),
        )
        n_ref = sum(n.startswith("reference-") for n in self.scorers)
        ranks, rewards = out[len(self.scorers) :], out[n_ref : len(self.scorers)]
        return {
            **({"ref_logprobs": torch.cat(out[:n_ref])} if n_ref else {}),  # else: the policy's
            **{k: torch.cat([r[k] for r in rewards]) for k in rewards[0]},  # scores, parts
            **{k: torch.cat([r[k] for r in ranks[:n_pol]]) for k in ranks[0]},  # old_logprobs ...
            **({"values": torch.cat(ranks[n_pol:])} if self.value else {}),
        }

    def update(self, batch: PPOBatch, round_index: int) -> dict[str, float]:
        self.threads.before("policy", "value")
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
        refs = self.policy.call("probe_logprobs") + [
            worker.probe_logprobs.remote(),
            worker.ping.remote(),
        ]
        learner, *_, sampled, worker_id = get_all(refs)
        return float((learner - sampled).abs().max()), worker_id

    def info(self) -> dict[str, float]:
        self._count_ray_restarts()
        return {
            "rollout/num_workers": len(self.pool.workers),
            "rollout/worker_restarts": self.pool.restarts,
            "train/learner_restarts": self.learner_restarts,
            "train/scorer_restarts": self.scorer_restarts,
            "recovery/replacements": self.pool.health.replacements,
            **sync_bytes(*self._sync_bytes),
            **self.last_sync,
        }

    def save(self, directory: Path, merged: bool = True) -> None:
        self._on_learners("save", directory, "", merged)

    def save_state(self, directory: Path) -> None:
        self._on_learners("save_state", directory, "_state")

    def load_state(self, directory: Path) -> None:
        self._on_learners("load_state", directory, "_state")

    def _on_learners(self, method: str, directory: Path, suffix: str = "", *args: Any) -> None:
        """``method(directory/<role><suffix>, *args)`` on every rank of every learner group."""
        refs = [
            r
            for g in self.learners
            for r in g.call(method, str(directory / (g.role + suffix)), *args)
        ]
        self._learners(method, refs)

    def close(self) -> None:
        while self._cleanup:
            self._cleanup.pop()()
