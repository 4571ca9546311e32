"""RayWorkers: the worker classes as named Ray actors, satisfying ``workers.Workers``.

Each phase submits every call first and then waits once (``_get_all``, which fails as soon as
one call fails). The weight sync streams buckets (``sync.bucket_mb``): the learner ranks gather
bucket k+1 while the rollout workers load bucket k, so no process holds more than about two
buckets beyond its model. Learner groups live in placement groups; every actor and group is
named, in the run's namespace (``cluster.namespace``, default ``rlhf_ray``): ``policy-0``,
``value-0``, ``reference-0``, ``reward-0``, ``rollout-0`` ...
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

from rlhf_ray.config import Config, optimizer_steps, value_init_spec
from rlhf_ray.distributed.plan import Node, format_plan, resource_plan, shortfalls
from rlhf_ray.errors import UserError
from rlhf_ray.stage_config import StageConfig
from rlhf_ray.types import PPOBatch, PromptBatch, Rollout
from rlhf_ray.workers.interface import mean_stats, shard_seed, split_rows
from rlhf_ray.workers.learners import PolicyLearner, ValueLearner
from rlhf_ray.workers.rollout import RolloutGenerator
from rlhf_ray.workers.scorers import ReferenceScorer, RewardScorer
from rlhf_ray.workers.sync import stream_buckets

NAMESPACE = "rlhf_ray"  # the default of cluster.namespace; actors join the driver's namespace


def connect(cfg: Config | StageConfig, address: str | None = None) -> str:
    """Join ``address`` / ``$RAY_ADDRESS`` if given, else start a local Ray on this machine."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace=cfg.cluster.namespace)
        return address
    ray.init(
        address="local",
        num_cpus=cfg.cluster.num_cpus,
        namespace=cfg.cluster.namespace,
        include_dashboard=False,
    )
    return "local"


def disconnect() -> None:
    """Leave the cluster (a local Ray started by ``connect`` stops with it)."""
    if ray.is_initialized():
        ray.shutdown()


def cluster_nodes() -> list[Node]:
    return [
        Node(n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0))
        for n in ray.nodes()
        if n.get("Alive")
    ]


@ray.remote(num_cpus=0)
def _gpu_memory_gb() -> float | None:
    """The smallest GPU's memory on this node, from ``nvidia-smi`` (None if there is none)."""
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout  # fmt: skip
        return min(float(x) for x in out.split()) * 2**20 / 1e9  # MiB -> GB
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def cluster_nodes_with_gpu_memory(timeout_s: float = 60.0) -> list[Node]:
    """``cluster_nodes`` plus what each GPU node reports of its GPUs' memory."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    out = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        cpus, gpus = n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0)
        memory = None
        if gpus:
            strategy = NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            try:
                memory = ray.get(
                    _gpu_memory_gb.options(scheduling_strategy=strategy).remote(),
                    timeout=timeout_s,
                )
            except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError):
                memory = None
        out.append(Node(cpus, gpus, memory))
    return out


def _threads(cpus: float) -> int:
    """Never more torch threads than the actor's CPU share (PLATFORM.md: 5x slower otherwise)."""
    return max(1, int(cpus))


def _env(cpus: float, gpus: float) -> dict[str, Any]:
    env = {"DS_ACCELERATOR": "cpu"} if gpus == 0 else {}
    env["OMP_NUM_THREADS"] = str(_threads(cpus))
    return {"env_vars": env}


def _kill(handles: list[Any], timeout_s: float = 30.0) -> None:
    """Kill actors and wait until Ray has released them (and so their names)."""
    for h in handles:
        ray.kill(h)
    deadline = time.monotonic() + timeout_s
    for h in handles:
        while time.monotonic() < deadline:
            try:
                ray.get(h.ping.remote(), timeout=1)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                break
            time.sleep(0.1)


def _check_namespace_free() -> None:
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


def _get_all(refs: list[Any]) -> list[Any]:
    """``ray.get`` of one phase that fails as soon as any call fails: the peers of a dead
    learner rank would otherwise be waited on until the collective timeout."""
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        ray.get(ready)
    return ray.get(refs)


def _wait_ready(handles: dict[str, Any], timeout_s: float) -> None:
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


def _actor(
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
        self, role: str, cls: type, role_cfg, timeout_s: float, dist_timeout_s: int, **kwargs: Any
    ):
        n, cpus, gpus = role_cfg.num_ranks, role_cfg.num_cpus_per_rank, role_cfg.num_gpus_per_rank
        bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
        self.pg = placement_group([bundle] * n, strategy="PACK", name=f"rlhf_ray-{role}")
        if not self.pg.wait(timeout_seconds=int(timeout_s)):
            remove_placement_group(self.pg)
            raise UserError(
                f"the {role} placement group ({n} x {bundle}) could not be placed "
                f"within {timeout_s:g}s"
            )
        self.actors = [
            _actor(cls, f"{role}-{rank}", cpus, gpus, rank=rank, world_size=n,
                   strategy=PlacementGroupSchedulingStrategy(self.pg, rank), **kwargs)
            for rank in range(n)
        ]  # fmt: skip
        self.handles = {f"{role}-{r}": a for r, a in enumerate(self.actors)}
        self.role, self.cfg, self.dist_timeout_s = role, role_cfg, dist_timeout_s

    def start(self) -> list[Any]:
        """Rendezvous then build engines; returns the refs of each rank's (local, total) params."""
        strategy = PlacementGroupSchedulingStrategy(self.pg, 0)
        addr, port = ray.get(_rendezvous_address.options(scheduling_strategy=strategy).remote())
        backend = "nccl" if self.cfg.num_gpus_per_rank else "gloo"
        _get_all(self.call("init_process_group", addr, port, self.dist_timeout_s, backend))
        return [a.setup.remote() for a in self.actors]

    def call(self, method: str, *args: Any) -> list[Any]:
        return [getattr(a, method).remote(*args) for a in self.actors]

    def kill(self) -> None:
        _kill(self.actors)
        remove_placement_group(self.pg)


class RolloutPool:
    """Rollout generators ``rollout-<id>`` with their own resources, independent of learners.

    The pool keeps the object refs of every bucket of the latest weights it was sent (in the
    object store, not in any process), so a worker that joins (a resize, or the replacement of
    a dead one, also in the middle of a sync) receives all of them before it generates. Ids
    are never reused.
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.workers: list[Any] = []
        self.restarts = 0
        self._next_id = 0
        self._version = -1
        self._count = 0  # buckets of `_version`
        self._buckets: list[Any] = []  # object refs of the buckets received so far

    def _spawn(self) -> tuple[str, Any]:
        r = self.cfg.rollout
        name = f"rollout-{self._next_id}"
        handle = _actor(
            RolloutGenerator, name, r.num_cpus_per_worker, r.num_gpus_per_worker,
            self.cfg.policy.model, self.cfg.tokenizer, r, worker_id=self._next_id,
        )  # fmt: skip
        self._next_id += 1
        return name, handle

    def grow(self, n: int) -> None:
        """Add ``n`` workers, ready and holding the current weights; none if they cannot start."""
        new = dict(self._spawn() for _ in range(n))
        try:
            _wait_ready(new, self.cfg.cluster.actor_start_timeout_s)
            ray.get([w.load_bucket.remote(ref, self._version, k, self._count)
                     for w in new.values() for k, ref in enumerate(self._buckets)])  # fmt: skip
        except BaseException:
            _kill(list(new.values()))
            raise
        self.workers.extend(new.values())

    def shrink(self, n: int) -> None:
        """Remove workers beyond the first ``n`` (between rounds: they hold no work)."""
        extra = self.workers[n:]
        del self.workers[n:]
        _kill(extra)

    def load(self, weights_ref: Any, version: int) -> None:
        """Every worker takes these (whole) weights; one that died is replaced."""
        self.begin(version, 1)
        self.load_bucket(weights_ref, 0)

    def begin(self, version: int, count: int) -> None:
        """A sync of ``version`` in ``count`` buckets starts (the old version's refs go)."""
        self._version, self._count, self._buckets = version, count, []

    def load_bucket(self, bucket_ref: Any, index: int) -> None:
        """Every worker loads bucket ``index``; one that died is replaced (the replacement
        gets every bucket received so far, this one included)."""
        assert index == len(self._buckets), "buckets arrive in order"
        self._buckets.append(bucket_ref)
        args = (bucket_ref, self._version, index, self._count)
        refs = [w.load_bucket.remote(*args) for w in self.workers]
        for index_w, ref in enumerate(refs):
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                self._replace(index_w, "while loading weights")

    def generate(self, prompts: PromptBatch, round_index: int, version: int) -> list[Rollout]:
        """One shard per worker. A worker that dies is replaced (with the current weights) and
        its shard redone with the same seed: no prompt is lost or sampled twice."""
        parts = split_rows(len(prompts), len(self.workers))
        seeds = [shard_seed(self.cfg.train.seed, round_index, i) for i in range(len(parts))]
        pending = {
            self.workers[i].generate.remote(prompts.select(rows), seeds[i], version): i
            for i, rows in enumerate(parts)
        }
        done: dict[int, Rollout] = {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            shard = pending.pop(ready[0])
            try:
                done[shard] = ray.get(ready[0])
            except ray.exceptions.RayActorError:
                self._replace(shard, "while generating; its shard is redone")
                work = prompts.select(parts[shard])
                pending[self.workers[shard].generate.remote(work, seeds[shard], version)] = shard
        return [done[i] for i in range(len(parts))]

    def _replace(self, index: int, when: str) -> None:
        """A fresh worker, holding the current weights, takes the place of a dead one."""
        if self.restarts >= 10 * len(self.workers):
            raise RuntimeError(f"rollout workers keep dying ({self.restarts} replaced)")
        self.restarts += 1
        print(f"[rlhf_ray] rollout worker {index} died {when}; replacing it", flush=True)
        _kill([self.workers.pop(index)])
        self.grow(1)
        self.workers.insert(index, self.workers.pop())

    def kill(self) -> None:
        _kill(self.workers)
        self.workers.clear()


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
        _check_namespace_free()
        self.pool = RolloutPool(cfg)
        self._cleanup: list[Callable[[], None]] = [self.pool.kill]  # undone in reverse
        try:
            self._start(cfg)
        except BaseException:
            self.close()  # leave nothing pending or half-started behind
            raise

    def _start(self, cfg: Config) -> None:
        timeout = cfg.cluster.actor_start_timeout_s
        dist_timeout = cfg.train.dist_timeout_s
        tok, ppo, seed = cfg.tokenizer, cfg.ppo, cfg.train.seed
        self.policy = LearnerGroup(
            "policy", PolicyLearner, cfg.policy, timeout, dist_timeout,
            policy_cfg=cfg.policy, ppo_cfg=ppo, tokenizer_cfg=tok,
            temperature=cfg.rollout.temperature, seed=seed, total_steps=optimizer_steps(cfg),
        )  # fmt: skip
        self._cleanup.append(self.policy.kill)
        self.value = LearnerGroup(
            "value", ValueLearner, cfg.value, timeout, dist_timeout,
            value_cfg=cfg.value, ppo_cfg=ppo, tokenizer_cfg=tok, seed=seed,
            model_spec=value_init_spec(cfg), total_steps=optimizer_steps(cfg),
        )  # fmt: skip
        self._cleanup.append(self.value.kill)
        ref, rew = cfg.reference, cfg.reward
        # The scorers are frozen and their calls pure, and a restart rebuilds the same model
        # (the reference from the policy's own deterministic spec), so Ray may restart them and
        # retry the interrupted call.
        self.references = [
            _actor(ReferenceScorer, f"reference-{i}", ref.num_cpus, ref.num_gpus,
                   ref.model or cfg.policy.model, tok, cfg.rollout.temperature,
                   chunk_size=ref.score_micro_batch_size, restarts=3)
            for i in range(ref.num_replicas)
        ]  # fmt: skip
        self._cleanup.append(lambda: _kill(self.references))
        self.rewards = [
            _actor(RewardScorer, f"reward-{i}", rew.num_cpus, rew.num_gpus, rew, tok,
                   search_path=[os.getcwd()], chunk_size=rew.score_micro_batch_size, restarts=3)
            for i in range(rew.num_replicas)
        ]  # fmt: skip
        self._cleanup.append(lambda: _kill(self.rewards))
        self.pool.grow(cfg.rollout.num_workers)  # the other actors start meanwhile
        others = {**self.policy.handles, **self.value.handles,
                  **{f"reference-{i}": a for i, a in enumerate(self.references)},
                  **{f"reward-{i}": a for i, a in enumerate(self.rewards)}}  # fmt: skip
        _wait_ready(others, timeout)
        counts = _get_all(self.policy.start() + self.value.start())
        self.param_counts = {
            "policy": counts[: cfg.policy.num_ranks],
            "value": counts[cfg.policy.num_ranks :],
        }
        for role, per_rank in self.param_counts.items():
            held = ", ".join(f"rank {r}: {loc:,}/{tot:,}" for r, (loc, tot) in enumerate(per_rank))
            print(f"[rlhf_ray] {role} parameters held per rank ({held})", flush=True)
        bucket_mb = cfg.sync.bucket_mb
        self._num_buckets = ray.get(self.policy.actors[0].num_weight_buckets.remote(bucket_mb))
        if ref.model is None:  # the reference starts as a copy of the policy, bucket by bucket

            def load(bucket: Any, index: int) -> None:
                _get_all([r.load_bucket.remote(bucket) for r in self.references])

            stream_buckets(self._num_buckets, self._gather_bucket, load)

    def _gather_bucket(self, index: int) -> Any:
        """Submit the gather of one bucket on every policy rank (a collective under ZeRO-3);
        returns a handle whose ``wait`` gives rank 0's ref (the bucket, left in the store)."""
        refs = self.policy.call("weight_bucket", index, self.cfg.sync.bucket_mb)

        def wait() -> Any:
            _get_all(refs[1:])  # the other ranks return None; fail fast if one died
            ray.wait(refs[:1], fetch_local=False)
            return refs[0]

        return wait

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
        n_pol, n_val = self.cfg.policy.num_ranks, self.cfg.value.num_ranks
        ref_parts = [
            rollout.select(rows) for rows in split_rows(len(rollout), len(self.references))
        ]
        rew_parts = [rollout.select(rows) for rows in split_rows(len(rollout), len(self.rewards))]
        refs = (
            [a.logprobs.remote(part) for a, part in zip(self.references, ref_parts, strict=True)]
            + [a.score.remote(part) for a, part in zip(self.rewards, rew_parts, strict=True)]
            + self.policy.call("logprobs", ref)
            + self.value.call("values", ref)
        )
        out = _get_all(refs)
        n_ref, n_rew = len(ref_parts), len(rew_parts)
        ranks = out[n_ref + n_rew :]
        return {
            "ref_logprobs": torch.cat(out[:n_ref]),
            "scores": torch.cat(out[n_ref : n_ref + n_rew]),
            "old_logprobs": torch.cat(ranks[:n_pol]),
            "values": torch.cat(ranks[n_pol : n_pol + n_val]),
        }

    def update(self, batch: PPOBatch, round_index: int) -> dict[str, float]:
        ref = ray.put(batch)
        n_pol = self.cfg.policy.num_ranks
        stats = _get_all(
            self.policy.call("train", ref, round_index) + self.value.call("train", ref, round_index)
        )
        return {**mean_stats(stats[:n_pol]), **mean_stats(stats[n_pol:])}

    def info(self) -> dict[str, float]:
        return {"rollout/num_workers": len(self.pool.workers),
                "rollout/worker_restarts": self.pool.restarts}  # fmt: skip

    def save(self, directory: Path) -> None:
        _get_all(
            self.policy.call("save", str(directory / "policy"))
            + self.value.call("save", str(directory / "value"))
        )

    def save_state(self, directory: Path) -> None:
        _get_all(
            self.policy.call("save_state", str(directory / "policy_state"))
            + self.value.call("save_state", str(directory / "value_state"))
        )

    def load_state(self, directory: Path) -> None:
        _get_all(
            self.policy.call("load_state", str(directory / "policy_state"))
            + self.value.call("load_state", str(directory / "value_state"))
        )

    def close(self) -> None:
        while self._cleanup:
            self._cleanup.pop()()
