"""The only package that imports ray: actor groups, placement groups, weight sync."""

from rlhf_ray.distributed.cluster import connect, disconnect
from rlhf_ray.distributed.runtime import RayWorkers
from rlhf_ray.distributed.stages import RayStage

__all__ = ["RayStage", "RayWorkers", "connect", "disconnect"]
