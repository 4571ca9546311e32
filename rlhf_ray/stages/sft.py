"""``rlhf-ray sft``: supervised fine-tuning of a causal LM on assistant replies.

The loss is the mean negative log-likelihood of the reply tokens only (and the EOS that closes
each reply); prompt tokens are context. Sequences are formatted and encoded as in
``rlhf_ray.data.stage_data``, the same text PPO's rollouts see.

Output: ``RUN/model/``, a Hugging Face causal LM plus its tokenizer (``AutoModelForCausalLM``
and ``AutoTokenizer.from_pretrained`` load it offline), ready for ``policy.model.path`` of
``rlhf-ray ppo`` or ``model.path`` of ``rlhf-ray train-rm``.
"""

from __future__ import annotations

from pathlib import Path

from rlhf_ray.config.stages import SFTConfig
from rlhf_ray.data.stage_data import encode_sft, load_sft_examples
from rlhf_ray.stages.checkpoint import prepare_resume, restore, saver
from rlhf_ray.stages.common import (
    StageResult,
    load_stage_data,
    stage_role,
    start_run,
    train_epochs,
)
from rlhf_ray.workers.interface import StageWorkers
from rlhf_ray.workers.learner import Learner
from rlhf_ray.workers.objectives import SFTObjective
from rlhf_ray.workers.stage_learners import StageRole


def sft_role(cfg: SFTConfig) -> StageRole:
    """The learner group of the stage (actors ``sft-0``, ``sft-1`` ...)."""
    return stage_role(cfg, "sft", Learner, SFTObjective(), "causal_lm")


def run_sft(
    cfg: SFTConfig, workers: StageWorkers, run_dir: Path, resume: bool = False
) -> StageResult:
    """Data -> (train -> evaluate) x epochs -> save (from the newest checkpoint, if ``resume``)."""
    checkpoint = prepare_resume(cfg, run_dir) if resume else None
    log, timer = start_run(cfg, run_dir)

    # 1. data: load, hold out, tokenize on the driver; every rank receives both sets
    with timer.phase("data"):
        tokenizer, train_set, eval_set = load_stage_data(
            cfg, workers, load_sft_examples, encode_sft, "sft", "examples"
        )

    # 2-3. train and evaluate, epoch by epoch
    start = restore(workers, checkpoint)
    has_eval, on_step = eval_set is not None, saver(workers, cfg, run_dir)
    final = train_epochs(workers, cfg.train, len(train_set), has_eval, log, timer, start, on_step)

    # 4. save: RUN/model, the fine-tuned causal LM and its tokenizer
    with timer.phase("save"):
        output = run_dir / "model"
        workers.save(output)
        tokenizer.save(output)
    log.close()
    shown = ", ".join(f"{k} {v:.4f}" for k, v in final.items() if k.endswith("loss"))
    print(f"[rlhf_ray] sft done: {shown}; model saved to {output}", flush=True)
    return StageResult(run_dir=run_dir, output=output, final=final)
