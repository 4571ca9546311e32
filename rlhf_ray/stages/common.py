"""What the stage drivers share: the learner group, the run dir and metrics log, the data step
(step 1: load, hold out, tokenize) and the epoch loop (steps 2 and 3: train, evaluate).

Metric rows (``metrics.jsonl``): one per optimizer step (``step``, ``epoch``, ``train/*``,
``time/step``), one per mid-epoch evaluation (``eval/*``), and one at the end of each epoch with
``epoch/train_*`` (a full pass over the train split with the epoch's final weights) and
``eval/*``. Stage-specific rows follow (e.g. the reward model's score statistics).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from rlhf_ray.config.ppo import LoggingConfig, to_yaml
from rlhf_ray.config.stages import StageConfigBase, StageDataBase, StageTrainConfig, stage_tokenizer
from rlhf_ray.data.stage_data import held_out_split
from rlhf_ray.data.tokenization import Tokenizer, build_tokenizer
from rlhf_ray.errors import UserError
from rlhf_ray.observe.metrics import MetricsLog, PhaseTimer, open_metrics_log
from rlhf_ray.types import Rows
from rlhf_ray.workers.interface import StageWorkers
from rlhf_ray.workers.learner import Learner
from rlhf_ray.workers.objectives import Objective
from rlhf_ray.workers.stage_learners import ModelBuilder, StageRole

Item = TypeVar("Item")


@dataclass
class StageResult:
    run_dir: Path
    output: Path  # the saved model directory
    final: dict[str, float] = field(default_factory=dict)  # the last epoch's figures


def stage_role(
    cfg: StageConfigBase, name: str, cls: type[Learner], objective: Objective, kind: str
) -> StageRole:
    """The stage's learner group: ``cfg.learner`` ranks (actors ``{name}-0`` ...) of ``cls``
    training ``cfg.model`` (built as ``kind``: "causal_lm" or "scalar") on ``objective``, a
    step per ``train.batch_size`` examples in micro-batches of ``train.micro_batch_size``."""
    train = cfg.train
    kwargs = {
        "model": cfg.model,
        "optim": cfg.optim,
        "build": ModelBuilder(kind, cfg.model, stage_tokenizer(cfg), cfg.learner.lora),
        "objective": objective,
        "minibatch": train.batch_size,
        "micro_batch": train.micro_batch_size,
        "epochs": train.epochs,
        "seed": train.seed,
        "max_bad_steps": train.max_bad_steps,
    }
    return StageRole(name, cls, cfg.learner, kwargs)


def start_run(cfg: StageConfigBase, run_dir: Path) -> tuple[MetricsLog, PhaseTimer]:
    """Create ``run_dir``, write ``config.yaml``, open ``metrics.jsonl``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    return stage_log(run_dir, cfg.logging), PhaseTimer()


def stage_log(run_dir: Path, logging: LoggingConfig) -> MetricsLog:
    """``metrics.jsonl`` and the sinks ``logging`` switches on (TensorBoard, W&B)."""
    return open_metrics_log(run_dir, logging, total=0, step_key="step", format_row=format_stage_row)


_SHOWN = (
    ("loss", "loss", "{:.4f}"),
    ("accuracy", "acc", "{:.3f}"),
    ("margin", "margin", "{:+.3f}"),
)


def format_stage_row(row: dict[str, Any]) -> str:
    """``step   12 | epoch 0 | train loss 0.6931 acc 0.500 | 0.21s`` (and eval/epoch rows)."""
    parts = [f"step {row['step']:>5} | epoch {row['epoch']}"]
    for prefix, label in (("train/", "train"), ("epoch/train_", "epoch train"), ("eval/", "eval")):
        shown = [
            f"{short} {fmt.format(row[prefix + key])}"
            for key, short, fmt in _SHOWN
            if isinstance(row.get(prefix + key), float)
        ]
        if shown:
            parts.append(f"{label} " + " ".join(shown))
    seconds = sum(v for k, v in row.items() if k.startswith("time/"))
    return " | ".join(parts) + f" | {seconds:.2f}s"


def prefixed(stats: dict[str, float], prefix: str) -> dict[str, float]:
    return {f"{prefix}{k}": v for k, v in stats.items()}


def split_examples(
    data: StageDataBase, seed: int, load: Callable[[str], Sequence[Item]]
) -> tuple[list[Item], list[Item]]:
    """``(train, eval)``: ``data.path`` and ``data.eval_path``, or a seeded held-out
    ``data.eval_fraction`` of ``data.path``. ``load(path)`` reads one source."""
    try:
        items = list(load(data.path))
        if data.eval_path is not None:
            return items, list(load(data.eval_path))
    except (ValueError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from None
    train, held = held_out_split(len(items), data.eval_fraction, seed)
    return [items[i] for i in train], [items[i] for i in held]


def load_stage_data(
    cfg: Any,
    workers: StageWorkers,
    read: Callable[..., tuple[list, int]],
    encode: Callable[..., Rows],
    stage: str,
    noun: str,
) -> tuple[Tokenizer, Rows, Rows | None]:
    """Step 1 of a stage: read ``cfg.data`` with ``read(path, format, split, skip_bad_rows)
    -> (items, bad rows)``, hold out the eval split, tokenize on the driver with
    ``encode(items, tokenizer, max_tokens, max_prompt_tokens)`` and give every rank both sets.
    Returns the tokenizer, the train set and the eval set (None: no held-out items)."""
    data, skipped = cfg.data, 0

    def load(path: str) -> list:
        nonlocal skipped
        items, bad = read(path, data.format, data.split, data.skip_bad_rows)
        skipped += bad
        return items

    tokenizer = build_tokenizer(stage_tokenizer(cfg))
    train_items, eval_items = split_examples(data, cfg.train.seed, load)
    train_set = encode(train_items, tokenizer, data.max_tokens, data.max_prompt_tokens)
    eval_set = (
        encode(eval_items, tokenizer, data.max_tokens, data.max_prompt_tokens)
        if eval_items
        else None
    )
    workers.load_data(train_set, eval_set)
    print(
        f"[rlhf_ray] {stage}: {len(train_items)} train / {len(eval_items)} eval {noun}"
        f" ({skipped} bad rows skipped) from {data.path}",
        flush=True,
    )
    return tokenizer, train_set, eval_set


def train_epochs(
    workers: StageWorkers,
    train: StageTrainConfig,
    num_train: int,
    has_eval: bool,
    log: MetricsLog,
    timer: PhaseTimer,
    start_step: int = 0,
    on_step: Callable[[int, int, int], None] | None = None,
) -> dict[str, Any]:
    """Steps 2-3 of a stage: ``train.epochs`` passes of optimizer steps over the train set,
    evaluations every ``train.eval_every`` steps and at each epoch's end. Steps up to
    ``start_step`` were done before (a resume); ``on_step(step, epoch, index)`` follows each
    step and its evaluations (the checkpoints). Returns the last epoch-end row."""
    steps = num_train // train.batch_size
    if steps == 0:
        raise UserError(
            f"{num_train} training examples do not fill one batch of train.batch_size "
            f"{train.batch_size}: lower it or give more data"
        )
    step, row = 0, dict[str, Any]()
    for epoch in range(train.epochs):
        for i in range(steps):
            if step < start_step:  # done before the checkpoint this run resumed from
                step += 1
                continue
            # 2. train: one optimizer step on the step's global minibatch (all ranks)
            with timer.phase("step"):
                stats = workers.train_step(epoch, i)
            step += 1
            log.write(
                {"step": step, "epoch": epoch, **prefixed(stats, "train/"), **timer.pop()},
                show=step % train.log_every == 0,
            )

            # 3. evaluate: the held-out split (and, at the epoch's end, the whole train split)
            end = i == steps - 1
            if end or (has_eval and train.eval_every and step % train.eval_every == 0):
                with timer.phase("eval"):
                    row = {"step": step, "epoch": epoch}
                    if end and train.eval_train_split:
                        row.update(prefixed(workers.evaluate("train"), "epoch/train_"))
                    if has_eval:
                        row.update(prefixed(workers.evaluate("eval"), "eval/"))
                log.write({**row, **timer.pop()})
            if on_step is not None:
                on_step(step, epoch, i)
    if not row:  # resumed after the last step: the final figures again, not logged twice
        row = {"step": step, "epoch": train.epochs - 1}
        if train.eval_train_split:
            row.update(prefixed(workers.evaluate("train"), "epoch/train_"))
        if has_eval:
            row.update(prefixed(workers.evaluate("eval"), "eval/"))
    return row
