"""``rlhf-ray train-rm``: a Bradley-Terry reward model trained on preference pairs.

Loss: mean of ``-log sigmoid(score(chosen) - score(rejected))`` (``algo.bradley_terry_loss``);
reported per step, per evaluation and per epoch: ``loss``, ``accuracy`` (share of pairs scored
chosen > rejected, ties half) and ``margin`` (mean chosen - rejected).

The model starts from ``model.path`` (e.g. ``SFT_RUN/model``: a causal LM gets a new one-label
head) or a tiny preset. A score is the head's output at the LAST REAL TOKEN of the sequence
``prompt + reply + EOS`` (``models.ScalarHeadModel.sequence_scores``), with the text formatted
as in ``rlhf_ray.data.stage_data`` (default chat format: the HH transcript, reply after
``"\\n\\nAssistant:"`` with a space, then the tokenizer's EOS).

Output format, ``RUN/reward_model/`` (what ``reward.model.path`` and ``eval`` read):

- ``config.json`` + ``model.safetensors``: a one-label ``*ForSequenceClassification``
  checkpoint; ``pad_token_id`` is the tokenizer's dedicated pad token (never EOS).
  ``config.json`` also holds ``rlhf_ray_score_mean`` and ``rlhf_ray_score_std``: mean and std of
  the final model's scores over every train sequence (chosen and rejected together); read them
  with ``rlhf_ray.models.read_score_stats(path)``.
- the tokenizer (``tokenizer.json``, ``tokenizer_config.json``) with ``padding_side="right"``
  and the chat template: then plain ``transformers``,
  ``model(**tok(texts, padding=True, return_tensors="pt")).logits[:, 0]``, gives the training
  score of each ``text = prompt_text + reply_text + tok.eos_token``: training sequences are
  encoded with the tokenizer's default special tokens (BOS first for a Llama-style tokenizer,
  ``tokenization.encode_prompt``), as ``tok(text)`` encodes them (for a chat template that
  writes BOS itself, pass ``add_special_tokens=False``, as transformers advises for templated
  text); right padding keeps the positions of real tokens at 0..L-1, and the classification
  head reads the last non-pad token. (rlhf_ray's own loaders pad on the left and pass
  positions from the mask.) Checked by ``tests/data/test_one_encoding.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlhf_ray.algo import bradley_terry_loss
from rlhf_ray.config.stages import RewardModelConfig
from rlhf_ray.data.stage_data import encode_pairs, load_pairs
from rlhf_ray.data.tokenization import Tokenizer
from rlhf_ray.models import write_score_stats
from rlhf_ray.stages.checkpoint import prepare_resume, restore, saver
from rlhf_ray.stages.common import (
    StageResult,
    load_stage_data,
    stage_role,
    start_run,
    train_epochs,
)
from rlhf_ray.workers.interface import StageWorkers
from rlhf_ray.workers.objectives import RewardObjective
from rlhf_ray.workers.stage_learners import RewardLearner, StageRole


def rm_role(cfg: RewardModelConfig) -> StageRole:
    """The learner group of the stage (actors ``rm-0``, ``rm-1`` ...)."""
    return stage_role(cfg, "rm", RewardLearner, RewardObjective(), "scalar")


def save_rm_tokenizer(tokenizer: Tokenizer, directory: Path) -> None:
    """The tokenizer, saved to pad on the right (see the module docstring)."""
    from transformers import AutoTokenizer

    tokenizer.save(directory)
    saved = AutoTokenizer.from_pretrained(str(directory))
    saved.padding_side = "right"
    saved.save_pretrained(str(directory))


def score_statistics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Bradley-Terry figures of a split's final scores, and their mean and std."""
    loss, stats = bradley_terry_loss(chosen, rejected)
    both = torch.cat([chosen, rejected])
    return {
        "loss": float(loss),
        "accuracy": float(stats["accuracy"]),
        "margin": float(stats["margin"]),
        "score_mean": float(both.mean()),
        "score_std": float(both.std()) if len(both) > 1 else 0.0,
    }


def run_train_rm(
    cfg: RewardModelConfig, workers: StageWorkers, run_dir: Path, resume: bool = False
) -> StageResult:
    """Data -> (train -> evaluate) x epochs -> score statistics -> save (from the newest
    checkpoint, if ``resume``)."""
    checkpoint = prepare_resume(cfg, run_dir) if resume else None
    log, timer = start_run(cfg, run_dir)

    # 1. data: load, hold out, tokenize on the driver; every rank receives both sets
    with timer.phase("data"):
        tokenizer, train_set, eval_set = load_stage_data(
            cfg, workers, load_pairs, encode_pairs, "train-rm", "pairs"
        )

    # 2-3. train and evaluate, epoch by epoch
    start = restore(workers, checkpoint)
    has_eval, on_step = eval_set is not None, saver(workers, cfg, run_dir)
    last = train_epochs(workers, cfg.train, len(train_set), has_eval, log, timer, start, on_step)

    # 4. score statistics of the final model over the train pairs (for reward.normalize)
    with timer.phase("stats"):
        train_stats = score_statistics(*workers.scores("train"))
        final = {f"final/train_{k}": v for k, v in train_stats.items()}
        if eval_set is not None:
            eval_stats = score_statistics(*workers.scores("eval"))
            final.update({f"final/eval_{k}": v for k, v in eval_stats.items()})
    log.write({"step": last["step"], "epoch": last["epoch"], **final, **timer.pop()}, show=False)

    # 5. save: RUN/reward_model, the sequence-classification model, tokenizer and statistics
    with timer.phase("save"):
        output = run_dir / "reward_model"
        workers.save(output)
        save_rm_tokenizer(tokenizer, output)
        write_score_stats(output, train_stats["score_mean"], train_stats["score_std"])
    log.close()
    split = "eval" if eval_set is not None else "train"
    print(
        f"[rlhf_ray] train-rm done: {split} accuracy {final[f'final/{split}_accuracy']:.3f}, "
        f"margin {final[f'final/{split}_margin']:+.3f}; train scores mean "
        f"{train_stats['score_mean']:+.4f} std {train_stats['score_std']:.4f}; "
        f"reward model saved to {output}",
        flush=True,
    )
    return StageResult(run_dir=run_dir, output=output, final=final)
