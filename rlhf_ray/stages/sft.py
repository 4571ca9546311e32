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

from rlhf_ray.data.stage_data import encode_sft, load_sft_examples
from rlhf_ray.stage_config import SFTConfig, learner_role, stage_tokenizer
from rlhf_ray.stages.checkpoint import prepare_resume, restore, saver
from rlhf_ray.stages.common import StageResult, split_examples, start_run, train_epochs
from rlhf_ray.tokenization import build_tokenizer
from rlhf_ray.workers.interface import StageWorkers
from rlhf_ray.workers.stage_learners import SFTLearner, StageRole


def sft_role(cfg: SFTConfig) -> StageRole:
    """The learner group of the stage (actors ``sft-0``, ``sft-1`` ...)."""
    kwargs = {
        "tokenizer_cfg": stage_tokenizer(cfg),
        "batch_size": cfg.train.batch_size,
        "seed": cfg.train.seed,
    }
    return StageRole("sft", SFTLearner, learner_role(cfg), kwargs)


def run_sft(
    cfg: SFTConfig, workers: StageWorkers, run_dir: Path, resume: bool = False
) -> StageResult:
    """Data -> (train -> evaluate) x epochs -> save (from the newest checkpoint, if ``resume``)."""
    checkpoint = prepare_resume(cfg, run_dir) if resume else None
    log, timer = start_run(cfg, run_dir)
    data = cfg.data
    skipped = 0

    def load(path: str) -> list:
        nonlocal skipped
        examples, bad = load_sft_examples(path, data.format, data.split, data.skip_bad_rows)
        skipped += bad
        return examples

    # 1. data: load, hold out, tokenize on the driver; every rank receives both sets
    with timer.phase("data"):
        tokenizer = build_tokenizer(stage_tokenizer(cfg))
        train_examples, eval_examples = split_examples(data, cfg.train.seed, load)
        train_set = encode_sft(train_examples, tokenizer, data.max_tokens, data.max_prompt_tokens)
        eval_set = (
            encode_sft(eval_examples, tokenizer, data.max_tokens, data.max_prompt_tokens)
            if eval_examples
            else None
        )
        workers.load_data(train_set, eval_set)
    print(
        f"[rlhf_ray] sft: {len(train_examples)} train / {len(eval_examples)} eval examples"
        f" ({skipped} bad rows skipped) from {data.path}",
        flush=True,
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
