"""Learner recovery: a run that survives a lost learner rank.

A learner rank that dies or hangs leaves its group's collectives waiting, so the group cannot go
on. ``run_ppo_recovering`` runs ``driver.run_ppo``; when a ``LearnerLostError`` ends it, both
learner groups are torn down and started again, and the run continues from its last complete
checkpoint (``run_ppo`` with ``resume=True``: the learners' exact training state, the prompt
sampler and the KL controller), at most ``train.max_restarts`` times. The restarts are counted
in the metrics (``train/learner_restarts``). Rounds after the checkpoint are redone with the
same seeds, so the result is the uninterrupted run's.
"""

from __future__ import annotations

from pathlib import Path

from rlhf_ray.config.ppo import Config
from rlhf_ray.errors import UserError
from rlhf_ray.ppo.checkpoint import latest_checkpoint
from rlhf_ray.ppo.loop import RunResult, run_ppo
from rlhf_ray.workers.interface import LearnerLostError, Workers


def run_ppo_recovering(
    cfg: Config, workers: Workers, run_dir: Path, resume: bool = False
) -> RunResult:
    """``run_ppo``, restarted from the last checkpoint after a lost learner rank."""
    restarts = 0
    while True:
        try:
            return run_ppo(cfg, workers, run_dir, resume=resume)
        except LearnerLostError as exc:
            restarts += 1
            _check_can_restart(cfg, run_dir, exc, restarts)
            print(
                f"[rlhf_ray] {exc}: restarting the learners from {latest_checkpoint(run_dir)} "
                f"({restarts}/{cfg.train.max_restarts})",
                flush=True,
            )
            restart = getattr(workers, "restart_learners", None)
            if restart is None:
                raise
            restart()
            resume = True


def _check_can_restart(cfg: Config, run_dir: Path, exc: Exception, restarts: int) -> None:
    if latest_checkpoint(run_dir) is None:
        raise UserError(
            f"{exc}, and the run has no complete checkpoint to restart from: set "
            "checkpoint.every to let a run recover from a lost learner"
        ) from None
    if restarts > cfg.train.max_restarts:
        raise UserError(
            f"{exc}; the learners were already restarted {cfg.train.max_restarts} times "
            "(train.max_restarts), so the run stops. Resume it with --resume once the cause "
            "is fixed."
        ) from None
