"""The only package that imports ray: actor groups, placement groups, weight sync."""

from rlhf_ray.distributed.runtime import RayWorkers, connect, disconnect

__all__ = ["RayWorkers", "connect", "disconnect"]
