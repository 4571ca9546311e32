"""The stages around PPO, each a readable top-to-bottom function like ``driver.run_ppo``:
``run_sft`` (``rlhf-ray sft``) and ``run_train_rm`` (``rlhf-ray train-rm``);
``stages.evaluate.run_eval`` (``rlhf-ray eval``)."""

from rlhf_ray.stages.common import StageResult
from rlhf_ray.stages.reward_model import rm_role, run_train_rm
from rlhf_ray.stages.sft import run_sft, sft_role

__all__ = ["StageResult", "rm_role", "run_sft", "run_train_rm", "sft_role"]
