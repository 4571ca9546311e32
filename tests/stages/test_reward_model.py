"""train-rm end to end (in-process): a preference set with a learnable property, scored back
by plain transformers from the saved directory."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhf_ray.config.stages import load_rm_config
from rlhf_ray.models import read_score_stats
from rlhf_ray.observe.metrics import read_metrics
from rlhf_ray.stages import rm_role, run_train_rm
from rlhf_ray.workers.inprocess import InProcessStage

WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "green",
    "quiet",
    "table",
    "window",
    "garden",
    "light",
    "music",
    "paper",
]


def preference_rows(n: int, seed: int) -> list[dict]:
    """Chosen replies are lowercase words; rejected ones are upper case with digits."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = rng.choice(WORDS)
        chosen = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
        rejected = " ".join(rng.choice(WORDS).upper() + str(rng.randint(0, 99))
                            for _ in range(rng.randint(2, 5)))  # fmt: skip
        rows.append({"prompt": f"Tell me about {topic}.", "chosen": chosen, "rejected": rejected})
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def rm_overrides(tmp_path, train_rows, eval_rows) -> list[str]:
    return [
        f"data.path={write_jsonl(tmp_path / 'train.jsonl', train_rows)}",
        f"data.eval_path={write_jsonl(tmp_path / 'eval.jsonl', eval_rows)}",
        "data.eval_fraction=0",
        "data.max_tokens=96",  # nothing is cut: plain transformers sees the same text
        "data.max_prompt_tokens=48",
        "learner.engine=torch",
        "learner.num_ranks=1",
        "train.epochs=2",
        "train.batch_size=16",
        "logging.progress=false",
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rm")
    eval_rows = preference_rows(32, seed=1)
    cfg = load_rm_config(None, rm_overrides(tmp, preference_rows(96, seed=0), eval_rows))
    workers = InProcessStage(rm_role(cfg), cfg.train.dist_timeout_s)
    try:
        result = run_train_rm(cfg, workers, tmp / "run")
        scores = {split: workers.scores(split) for split in ("train", "eval")}
    finally:
        workers.close()
    return result, scores, eval_rows


def plain_transformers_scores(directory, rows) -> tuple[torch.Tensor, torch.Tensor]:
    """What a user of transformers alone would write: chat template + EOS, batch, logits."""
    tok = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForSequenceClassification.from_pretrained(directory).eval()

    def score(reply_field: str) -> torch.Tensor:
        texts = [
            tok.apply_chat_template(
                [{"role": "user", "content": r["prompt"]},
                 {"role": "assistant", "content": r[reply_field]}], tokenize=False,
            ) + tok.eos_token
            for r in rows
        ]  # fmt: skip
        with torch.no_grad():
            return model(**tok(texts, padding=True, return_tensors="pt")).logits[:, 0]

    return score("chosen"), score("rejected")


def test_held_out_accuracy_by_plain_transformers_reaches_0_9(trained):
    result, _, eval_rows = trained
    chosen, rejected = plain_transformers_scores(result.output, eval_rows)
    accuracy = float((chosen > rejected).float().mean())
    assert accuracy >= 0.9, accuracy
    assert result.final["final/eval_accuracy"] == pytest.approx(accuracy)


def test_saved_model_gives_the_training_scores(trained):
    result, scores, eval_rows = trained
    chosen, rejected = plain_transformers_scores(result.output, eval_rows)
    torch.testing.assert_close(chosen, scores["eval"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(rejected, scores["eval"][1], atol=1e-5, rtol=0)


def test_score_statistics_are_those_of_the_train_scores(trained):
    result, scores, _ = trained
    both = torch.cat(scores["train"])
    mean, std = read_score_stats(result.output)
    assert mean == pytest.approx(float(both.mean()), abs=1e-6)
    assert std == pytest.approx(float(both.std()), abs=1e-6)
    config = json.loads((result.output / "config.json").read_text())
    assert len(config["id2label"]) == 1 and config["pad_token_id"] != config["eos_token_id"]


def test_metrics_have_a_row_per_step_and_per_epoch_and_the_loss_falls(trained):
    result, _, _ = trained
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    steps = [r for r in rows if "train/loss" in r]
    epochs = [r for r in rows if "epoch/train_accuracy" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))  # 96 // 16 = 6 steps x 2 epochs
    assert [r["epoch"] for r in epochs] == [0, 1]
    assert all({"eval/loss", "eval/accuracy", "eval/margin"} <= set(r) for r in epochs)
    # from about log 2 at the first step (a fresh head scores both sides alike) to well below
    assert epochs[-1]["eval/loss"] < 0.5 < steps[0]["train/loss"]
    assert epochs[-1]["eval/accuracy"] >= epochs[0]["eval/accuracy"] - 0.05
    assert (result.run_dir / "config.yaml").exists()


def test_bundled_sample_is_read_by_the_default_config(tmp_path):
    """The embedded default's data path and held-out split (no training)."""
    cfg = load_rm_config()
    assert cfg.data.path == "builtin:hh-rlhf" and cfg.data.eval_fraction == 0.1
