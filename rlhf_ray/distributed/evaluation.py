"""RayEvalWorkers: ``rlhf-ray eval``'s workers as named Ray actors (see
``workers.evaluation``): a rollout pool per policy (``rollout-policy-<id>``,
``rollout-baseline-<id>``), a log-prob scorer per policy (``scorer-policy``,
``scorer-baseline``) and ``reward``. Both pools generate at once; the four scoring calls of a
step are submitted together and waited on once.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
import torch

from rlhf_ray.config.stages import EvalConfig, eval_tokenizer
from rlhf_ray.distributed.actors import (
    check_namespace_free,
    get_all,
    kill_actors,
    spawn_actor,
    spread_strategy,
    wait_ready,
)
from rlhf_ray.distributed.cluster import cluster_nodes
from rlhf_ray.distributed.rollout_pool import RolloutPool
from rlhf_ray.errors import UserError
from rlhf_ray.rewards.remote import driver_options
from rlhf_ray.types import PromptBatch, Rollout
from rlhf_ray.workers.evaluation import LOADED, MODELS
from rlhf_ray.workers.scorers import ReferenceScorer, RewardScorer


def _check_fits(cfg: EvalConfig) -> None:
    """Refuse (rather than wait on pending actors) when the actors ask for more CPUs or GPUs
    than the cluster has."""
    r, s, w = cfg.rollout, cfg.scorer, cfg.reward
    cpus = 2 * (r.num_workers * r.num_cpus_per_worker + s.num_cpus) + w.num_cpus
    gpus = 2 * (r.num_workers * r.num_gpus_per_worker + s.num_gpus) + w.num_gpus
    nodes = cluster_nodes()
    have_cpus, have_gpus = sum(n.cpus for n in nodes), sum(n.gpus for n in nodes)
    if cpus > have_cpus or gpus > have_gpus:
        raise UserError(
            f"eval needs {cpus:g} CPUs and {gpus:g} GPUs (2 x {r.num_workers} rollout workers, "
            f"2 scorers, the reward) but the cluster has {have_cpus:g} CPUs and {have_gpus:g} "
            "GPUs: lower rollout.num_workers or the per-actor resources"
        )


class RayEvalWorkers:
    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg
        _check_fits(cfg)
        check_namespace_free()
        tok = eval_tokenizer(cfg)
        specs = {"policy": cfg.policy, "baseline": cfg.baseline}
        self.pools = {
            m: RolloutPool(cfg, specs[m], tok, prefix=f"rollout-{m}", seed=cfg.eval.seed)
            for m in MODELS
        }
        self.scorers: dict[str, Any] = {}
        self.reward: Any = None
        try:
            s, t = cfg.scorer, cfg.rollout.temperature
            for m in MODELS:  # frozen and pure: Ray may restart them and retry a call
                self.scorers[m] = spawn_actor(
                    ReferenceScorer,
                    f"scorer-{m}",
                    s.num_cpus,
                    s.num_gpus,
                    specs[m],
                    tok,
                    t,
                    restarts=3,
                    strategy=spread_strategy(cfg),
                )
            w = cfg.reward
            self.reward = spawn_actor(
                RewardScorer,
                "reward",
                w.num_cpus,
                w.num_gpus,
                w,
                tok,
                search_path=[os.getcwd()],
                remote=driver_options(w, cfg.eval.phase_timeout_s),  # tokens: never runtime_env
                restarts=3,
                strategy=spread_strategy(cfg),
            )
            for pool in self.pools.values():
                pool.grow(cfg.rollout.num_workers)
            handles = {f"scorer-{m}": h for m, h in self.scorers.items()}
            wait_ready({**handles, "reward": self.reward}, cfg.cluster.actor_start_timeout_s)
        except BaseException:
            self.close()
            raise

    def generate(self, prompts: PromptBatch, step: int) -> dict[str, Rollout]:
        with ThreadPoolExecutor(len(MODELS)) as threads:  # both pools sample at once
            shards = {
                m: threads.submit(pool.generate, prompts, step, LOADED)
                for m, pool in self.pools.items()
            }
            return {m: Rollout.concat(f.result()) for m, f in shards.items()}

    def score(self, samples: dict[str, Rollout]) -> dict[str, torch.Tensor]:
        refs = {m: ray.put(samples[m]) for m in MODELS}
        calls = {f"{m}/scores": self.reward.score.remote(refs[m]) for m in MODELS}
        calls |= {f"{m}/logprobs": self.scorers[m].logprobs.remote(refs["policy"]) for m in MODELS}
        return dict(zip(calls, get_all(list(calls.values())), strict=True))

    def close(self) -> None:
        for pool in self.pools.values():
            pool.kill()
        kill_actors([h for h in [*self.scorers.values(), self.reward] if h is not None])
        self.scorers.clear()
        self.reward = None
