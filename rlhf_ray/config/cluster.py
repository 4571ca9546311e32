"""The ``cluster`` section: where a run's actors go (Ray's resources, nodes, start-up limits);
``rlhf_ray.config.ppo`` re-exports it."""

from __future__ import annotations

from pydantic import Field

from rlhf_ray.config.sections import Section


class NodeSpec(Section):
    """One kind of node of a cluster described offline (for `rlhf-ray plan`)."""

    cpus: float = Field(..., ge=0, description="CPUs per node.")
    gpus: float = Field(0.0, ge=0, description="GPUs per node.")
    count: int = Field(1, ge=1, description="Nodes of this kind.")
    gpu_memory_gb: float | None = Field(
        None, gt=0, description="Memory of each GPU in GB (null: the memory check is skipped)."
    )


class ClusterConfig(Section):
    """How Ray is reached and how long actors may wait for resources."""

    nodes: list[NodeSpec] | None = Field(
        None,
        description="The target cluster, for planning without connecting to it (null: the "
        "cluster at --address/RAY_ADDRESS, else this machine).",
    )

    num_cpus: int | None = Field(
        None, gt=0, description="CPUs of a locally started Ray (null: all of this machine)."
    )
    namespace: str = Field(
        "rlhf_ray",
        min_length=1,
        description="Ray namespace of the run's named actors (one run per namespace at a time).",
    )
    actor_start_timeout_s: float = Field(
        180.0, gt=0, description="Give up (clearly) if actors stay pending this long."
    )
    learner_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each learner rank also requests, to pin the learner "
        "groups to nodes that offer them (e.g. {learner_node: 0.01}).",
    )
    spread: bool = Field(
        True,
        description="Spread rollout workers and scorers over the cluster's nodes (Ray SPREAD "
        "scheduling), so that losing one node loses few of them.",
    )
    phase_threads: bool = Field(
        True,
        description="Before each phase, split the CPUs the run's CPU-only actors hold on a node "
        "among those that work in that phase (the update's learners, generation's rollout "
        "workers) as torch threads; false: every actor keeps its CPU share of threads.",
    )
