"""rlhf_ray: RLHF with PPO as a Ray actor system."""

__version__ = "0.1.0"
