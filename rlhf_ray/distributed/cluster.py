"""The cluster connection and what it holds: ``connect`` / ``disconnect`` and the live nodes.

``connect`` joins the cluster of ``--address`` / ``$RAY_ADDRESS`` or starts a local Ray; either
way Ray's own notices about it (token authentication of a local cluster, "Started a local Ray
instance") stay off the console (``rlhf_ray.observe.quiet``). Ray is imported only when used, so
``rlhf-ray plan`` against the config or this machine does not import it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from rlhf_ray.config.ppo import Config
from rlhf_ray.config.stages import EvalConfig, StageConfig
from rlhf_ray.observe.quiet import quiet_local_ray

NAMESPACE = "rlhf_ray"  # the default of cluster.namespace; actors join the driver's namespace


@dataclass(frozen=True)
class Node:
    cpus: float
    gpus: float
    gpu_memory_gb: float | None = None  # memory of each of its GPUs, if known


def connect(cfg: Config | StageConfig | EvalConfig, address: str | None = None) -> str:
    """Join ``address`` / ``$RAY_ADDRESS`` if given, else start a local Ray on this machine."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    quiet = logging.WARNING  # no "Started a local Ray instance" / "Connecting to ..." lines
    if address:
        ray.init(address=address, namespace=cfg.cluster.namespace, logging_level=quiet)
        return address
    quiet_local_ray()
    ray.init(
        address="local",
        num_cpus=cfg.cluster.num_cpus,
        namespace=cfg.cluster.namespace,
        include_dashboard=False,
        logging_level=quiet,
    )
    return "local"


def disconnect() -> None:
    """Leave the cluster (a local Ray started by ``connect`` stops with it)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _gpu_memory_gb() -> float | None:
    """The smallest GPU's memory on this node, from ``nvidia-smi`` (None if there is none)."""
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
        return min(float(x) for x in out.split()) * 2**20 / 1e9  # MiB -> GB
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def cluster_hosts() -> int:
    """How many machines the live Ray nodes run on (several raylets may share one)."""
    import ray

    return len({n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")})


def cluster_nodes(gpu_memory: bool = False, timeout_s: float = 60.0) -> list[Node]:
    """The live nodes' CPUs and GPUs; with ``gpu_memory``, also what each GPU node reports of
    its GPUs' memory (one small task per GPU node, at most ``timeout_s`` each)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0)(_gpu_memory_gb)
    out = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        cpus, gpus = n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0)
        memory = None
        if gpu_memory and gpus:
            strategy = NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            try:
                memory = ray.get(
                    probe.options(scheduling_strategy=strategy).remote(),
                    timeout=timeout_s,
                )
            except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError):
                memory = None
        out.append(Node(cpus, gpus, memory))
    return out
