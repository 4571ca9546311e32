"""The resource plan: which actors each role needs, and whether a cluster can hold them.

Ray leaves actors whose resources no node can provide PENDING forever (a learner rank left
pending deadlocks the rendezvous of the others), so every run checks the plan first and fails
within seconds, naming the shortfall. ``rlhf-ray plan`` also estimates each role's memory per
device from its model's ``config.json`` (``rlhf_ray.models.memory``) and refuses a role that cannot
fit its GPUs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from rlhf_ray.config.ppo import Config, has_critic
from rlhf_ray.distributed.cluster import NAMESPACE, Node, cluster_nodes


@dataclass(frozen=True)
class RolePlan:
    role: str
    actors: int
    cpus: float  # per actor
    gpus: float  # per actor
    group: bool  # ranks of one placement group (must all be placed together)

    @property
    def total_cpus(self) -> float:
        return self.actors * self.cpus

    @property
    def total_gpus(self) -> float:
        return self.actors * self.gpus


def resource_plan(cfg: Config) -> list[RolePlan]:
    """The actors of a run (a scorer role: one per replica); no value group for a critic-free
    estimator (``algo.estimator``)."""
    value = cfg.value
    critic = (
        [RolePlan("value", value.num_ranks, value.num_cpus_per_rank, value.num_gpus_per_rank, True)]
        if has_critic(cfg)
        else []
    )
    # reference.from_policy_base: the policy learner scores the reference, no actor of its own
    scorers = [("reference", cfg.reference)] * (not cfg.reference.from_policy_base)
    scorers.append(("reward", cfg.reward))
    return [
        RolePlan(
            "policy",
            cfg.policy.num_ranks,
            cfg.policy.num_cpus_per_rank,
            cfg.policy.num_gpus_per_rank,
            True,
        ),
        *critic,
        *(RolePlan(role, sc.num_replicas, sc.num_cpus, sc.num_gpus, False) for role, sc in scorers),
        RolePlan(
            "rollout",
            cfg.rollout.num_workers,
            cfg.rollout.num_cpus_per_worker,
            cfg.rollout.num_gpus_per_worker,
            False,
        ),
        *remote_rows(cfg),
    ]


def remote_rows(cfg: Config) -> list[RolePlan]:
    """A row per reward service (``reward.remote``, remote terms): it runs elsewhere, so no
    actor and no resources here (the reward actors call it)."""
    remotes = [cfg.reward.remote] + [t.remote for t in cfg.reward.terms]
    return [RolePlan("remote", 0, 0.0, 0.0, False) for r in remotes if r is not None]


def _fmt(x: float) -> str:
    return f"{x:g}"


def _take_gpus(free: list[float], gpus: float) -> bool:
    """Place one actor's ``gpus`` on a node's GPUs as Ray does, updating ``free`` (each GPU's
    free fraction): a request below 1 on ONE GPU with that much left, a larger one on whole
    free GPUs. False (``free`` unchanged) if it does not fit."""
    if gpus <= 0:
        return True
    if gpus < 1:
        for i, left in enumerate(free):
            if left + 1e-9 >= gpus:
                free[i] = left - gpus
                return True
        return False
    whole = [i for i, left in enumerate(free) if left >= 1 - 1e-9]
    need = math.ceil(gpus - 1e-9)
    if len(whole) < need:
        return False
    for i in whole[:need]:
        free[i] = 0.0
    return True


def _node_gpus(node: Node) -> list[float]:
    """A node's GPUs as free fractions (a fractional GPU count keeps its remainder)."""
    whole = int(node.gpus + 1e-9)
    rest = node.gpus - whole
    return [1.0] * whole + ([rest] if rest > 1e-9 else [])


def _place(slot: tuple[list[float], list[float]], cpus: float, gpus: float, n: int) -> bool:
    """``n`` actors of ``cpus`` and ``gpus`` each on one node (``slot``: its free CPUs, in a
    one-item list, and its GPUs' free fractions), all or none."""
    cpu, gpu = slot
    trial = list(gpu)
    if cpu[0] + 1e-9 < cpus * n or not all(_take_gpus(trial, gpus) for _ in range(n)):
        return False
    cpu[0] -= cpus * n
    gpu[:] = trial
    return True


def shortfalls(plan: list[RolePlan], nodes: list[Node]) -> list[str]:
    """Why ``nodes`` cannot hold ``plan`` (empty if they can).

    Totals first, then a first-fit-decreasing packing onto the nodes, which catches an actor
    larger than any single node even when the totals suffice. GPUs are packed per GPU, as Ray
    places them: a fraction below 1 must fit on one GPU (3 x 0.6 do not fit 2 GPUs). A learner
    group packs as one unit: its ranks are placed on one node (``STRICT_PACK``).
    """
    need_cpu = sum(r.total_cpus for r in plan)
    need_gpu = sum(r.total_gpus for r in plan)
    have_cpu = sum(n.cpus for n in nodes)
    have_gpu = sum(n.gpus for n in nodes)
    problems = []
    if need_gpu > have_gpu + 1e-9:
        problems.append(f"needs {_fmt(need_gpu)} GPUs, cluster has {_fmt(have_gpu)}")
    if need_cpu > have_cpu + 1e-9:
        problems.append(f"needs {_fmt(need_cpu)} CPUs, cluster has {_fmt(have_cpu)}")
    if problems:
        return problems
    free = [([n.cpus], _node_gpus(n)) for n in nodes]
    # a learner group is one unit: its ranks share a node (STRICT_PACK, see LearnerGroup)
    units = [
        (r, r.actors if r.group else 1) for r in plan for _ in range(1 if r.group else r.actors)
    ]
    units.sort(key=lambda u: (u[0].gpus * u[1], u[0].cpus * u[1]), reverse=True)
    for r, n in units:
        if any(_place(slot, r.cpus, r.gpus, n) for slot in free):
            continue
        cpus, gpus = r.cpus * n, r.gpus * n
        what = (
            f"the {r.role} group ({n} ranks: {_fmt(cpus)} CPUs, {_fmt(gpus)} GPUs on one "
            "node, as NCCL groups must not span nodes)"
            if r.group
            else f"a {r.role} actor ({_fmt(cpus)} CPUs, {_fmt(gpus)} GPUs"
            + (", a fraction of ONE GPU, as Ray places it)" if 0 < r.gpus < 1 else ")")
        )
        problems.append(f"{what} fits on no node once the others are placed")
        break
    return problems


def format_plan(plan: list[RolePlan], nodes: list[Node], memory: dict | None = None) -> str:
    """The placement table; with ``memory`` (``rlhf_ray.models.memory.role_memory``) a column of the
    estimated GB per device (params+grads+optimizer / activations+KV cache)."""
    mem_head = f" {'GB/device':>9} {'(states/acts)':>13}" if memory else ""
    lines = [
        f"{'role':<10} {'actors':>6} {'CPUs each':>10} {'GPUs each':>10} {'CPUs':>6} {'GPUs':>6}"
        + mem_head
    ]
    for r in plan:
        mem = ""
        if memory:
            est = memory.get(r.role)
            if est is None or isinstance(est, str):
                mem = f" {'?':>9} {'':>13}"
            else:
                split = f"{est.states / 1e9:.2f}/{(est.total - est.states) / 1e9:.2f}"
                mem = f" {est.total / 1e9:>9.2f} {split:>13}"
        lines.append(
            f"{r.role:<10} {r.actors:>6} {_fmt(r.cpus):>10} {_fmt(r.gpus):>10} "
            f"{_fmt(r.total_cpus):>6} {_fmt(r.total_gpus):>6}" + mem
        )
    lines.append(
        f"{'total':<10} {sum(r.actors for r in plan):>6} {'':>10} {'':>10} "
        f"{_fmt(sum(r.total_cpus for r in plan)):>6} "
        f"{_fmt(sum(r.total_gpus for r in plan)):>6}"
    )
    lines.append(
        f"cluster: {len(nodes)} node(s), "
        f"{_fmt(sum(n.cpus for n in nodes))} CPUs, {_fmt(sum(n.gpus for n in nodes))} GPUs"
    )
    return "\n".join(lines)


def engine_summary(cfg: Config) -> str:
    """One line: the engine each learner group trains with on this plan, and why when
    ``engine`` is auto (``LearnerConfig.engine_for``; in process a group is one rank)."""
    parts = []
    for role in ("policy", "value")[: 1 + has_critic(cfg)]:
        group = getattr(cfg, role)
        dtype = group.model.dtype
        part = f"{role} {_engine_name(group, group.engine_for(group.num_ranks, dtype))}"
        if group.engine == "auto":
            why = [f"{group.num_ranks} ranks"] * (group.num_ranks > 1)
            why += [dtype] * (dtype != "float32")
            why += ["offload"] * (group.offload_optimizer or group.offload_params)
            why += ["ZeRO-3"] * (group.zero_stage == 3)
            alone = _engine_name(group, group.engine_for(1, dtype))
            part += f" (auto: {', '.join(why) or 'one float32 rank'}; in process: {alone})"
        parts.append(part)
    return "engines: " + "; ".join(parts)


def _engine_name(group: Any, engine: str) -> str:
    return f"deepspeed ZeRO-{group.zero_stage}" if engine == "deepspeed" else "torch AdamW"


def visible_nodes(cfg: Config, address: str | None) -> tuple[list[Node], str]:
    """The cluster to plan against: a live one, the config's description, or this machine."""
    import logging
    import os

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        import ray

        ray.init(address=address, namespace=NAMESPACE, logging_level=logging.ERROR)
        try:
            return cluster_nodes(gpu_memory=True), f"Ray cluster at {address}"
        finally:
            ray.shutdown()
    if cfg.cluster.nodes:
        nodes = [
            Node(n.cpus, n.gpus, n.gpu_memory_gb) for n in cfg.cluster.nodes for _ in range(n.count)
        ]
        return nodes, "cluster.nodes of the config"
    import torch

    cpus = cfg.cluster.num_cpus or float(os.cpu_count() or 1)
    gpus = torch.cuda.device_count()
    gpu_gb = (
        min(torch.cuda.get_device_properties(i).total_memory for i in range(gpus)) / 1e9
        if gpus
        else None
    )
    return [Node(cpus, float(gpus), gpu_gb)], "this machine (local Ray)"


def gpu_memory_gb(nodes: list[Node]) -> float | None:
    """The smallest known GPU memory among GPU nodes (roles may land on any of them)."""
    known = [n.gpu_memory_gb for n in nodes if n.gpus > 0 and n.gpu_memory_gb]
    return min(known) if known else None


def check_plan(cfg: Config, address: str | None = None) -> int:
    """Print the placement table; exit status 1 (with the shortfall) if it cannot fit."""
    import sys

    from rlhf_ray.models.memory import memory_problems, role_memory

    plan = resource_plan(cfg)
    nodes, where = visible_nodes(cfg, address)
    memory = role_memory(cfg)
    print(format_plan(plan, nodes, memory))
    print(engine_summary(cfg))
    if not has_critic(cfg):
        print(f"no value group: algo.estimator {cfg.algo.estimator} is critic-free.")
    remotes = [("reward.remote", cfg.reward.remote)]
    remotes += [(f"reward.terms[{t.name}].remote", t.remote) for t in cfg.reward.terms]
    for setting, remote in remotes:
        if remote is not None:
            print(f"remote: {setting} {remote.url} (a service elsewhere, no resources here)")
    gpu_gb = gpu_memory_gb(nodes)
    unknown = [f"{role} ({why})" for role, why in memory.items() if isinstance(why, str)]
    if unknown:
        print("memory not estimated for: " + "; ".join(unknown))
    if gpu_gb is None and any(r.gpus > 0 for r in plan):
        print("GPU memory unknown (set cluster.nodes[].gpu_memory_gb): memory not checked")
    per_actor = {r.role: r.gpus for r in plan}
    problems = shortfalls(plan, nodes) + memory_problems(memory, per_actor, gpu_gb)
    if problems:
        print(f"rlhf-ray plan: does not fit {where}: " + "; ".join(problems) + ".", file=sys.stderr)
        return 1
    print(f"fits {where}.")
    return 0
