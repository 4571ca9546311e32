"""Stage checkpoints, ``--resume`` and recovery of ``rlhf-ray sft`` / ``train-rm``.

A checkpoint is ``RUN/checkpoints/step_XXXXXX/`` written every ``checkpoint.every`` optimizer
steps: ``state/`` (the learner group's training state: weights and optimizer, ZeRO-partitioned
per rank under DeepSpeed, as PPO's ``policy_state/``), ``stage_state.json`` (the data cursor:
global step, epoch and step within it) and the resolved ``config.yaml``. As in
``rlhf_ray/ppo/checkpoint.py`` it is written to a temp dir, fsynced, renamed into place, and only
then are checkpoints beyond ``checkpoint.keep_last`` removed. No RNG state is saved: the
example order of epoch ``e`` is a permutation seeded by ``(train.seed, e)`` (see
``workers/stage_learners.py``), so the cursor is all a resumed run needs to take the same steps.

``run_stage_recovering`` runs a stage and, when a learner rank is lost (``LearnerLostError``),
restarts the learner group and continues from the newest checkpoint, at most
``checkpoint.max_restarts`` times.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhf_ray.config.ppo import to_yaml
from rlhf_ray.config.stages import StageConfigBase
from rlhf_ray.errors import UserError
from rlhf_ray.ppo.checkpoint import publish_checkpoint, truncate_metrics
from rlhf_ray.workers.interface import LearnerLostError

PARTS = ("state", "config.yaml", "stage_state.json")  # stage_state.json is written last
# settings a resumed stage may change: none of them alters the steps it takes
RESUMABLE = (
    "train.epochs",
    "train.log_every",
    "train.dist_timeout_s",
    "checkpoint.",
    "logging.",
    "cluster.",
    "learner.num_cpus_per_rank",
)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete stage checkpoints, oldest first (a temp dir of a save is never one)."""
    found = (run_dir / "checkpoints").glob("step_*")
    return sorted(p for p in found if all((p / part).exists() for part in PARTS))


def save_stage_checkpoint(workers: Any, cfg: StageConfigBase, run_dir: Path, state: dict) -> Path:
    """Write ``checkpoints/step_XXXXXX`` atomically, then keep the last ``keep_last``."""
    root = run_dir / "checkpoints"
    final = root / f"step_{state['step']:06d}"
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    workers.save_state(tmp / "state")
    (tmp / "config.yaml").write_text(to_yaml(cfg))
    (tmp / "stage_state.json").write_text(json.dumps(state))
    publish_checkpoint(tmp, final)
    for stale in complete_checkpoints(run_dir)[: -cfg.checkpoint.keep_last]:
        shutil.rmtree(stale)
    return final


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "learner_resources":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_stage_resumable(checkpoint: Path, cfg: StageConfigBase) -> None:
    """Refuse to resume with settings that change the steps the stage takes."""
    import yaml

    saved = yaml.safe_load((checkpoint / "config.yaml").read_text())
    # through the schema: settings added since the checkpoint was written take their defaults
    old = _flat(type(cfg).model_validate(saved).model_dump(mode="json"))
    new = _flat(cfg.model_dump(mode="json"))
    changed = sorted(
        k
        for k in old.keys() | new.keys()
        if old.get(k) != new.get(k) and not k.startswith(RESUMABLE)
    )
    if changed:
        shown = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in changed[:5])
        raise UserError(
            f"cannot resume from {checkpoint}: the config differs in {shown}; resume with the "
            "config the run was started with (config.yaml in the checkpoint)"
        )


def prepare_resume(cfg: StageConfigBase, run_dir: Path) -> Path | None:
    """Before the metrics log opens: the newest complete checkpoint (None: start over), its
    config checked, and the metric rows of later steps dropped (the resumed run writes them
    again)."""
    done = complete_checkpoints(run_dir)
    if not done:
        print(f"[rlhf_ray] no complete checkpoint in {run_dir}: starting from step 0", flush=True)
        truncate_metrics(run_dir / "metrics.jsonl", 0, key="step")
        return None
    check_stage_resumable(done[-1], cfg)
    state = json.loads((done[-1] / "stage_state.json").read_text())
    truncate_metrics(run_dir / "metrics.jsonl", state["step"], key="step")
    return done[-1]


def restore(workers: Any, checkpoint: Path | None) -> int:
    """Load the checkpoint's training state into the learners; the optimizer steps done."""
    if checkpoint is None:
        return 0
    workers.load_state(checkpoint / "state")
    print(f"[rlhf_ray] resumed from {checkpoint}", flush=True)
    return int(json.loads((checkpoint / "stage_state.json").read_text())["step"])


def saver(workers: Any, cfg: StageConfigBase, run_dir: Path) -> Callable[[int, int, int], None]:
    """``on_step(step, epoch, index)`` of ``train_epochs``: a checkpoint every K steps."""

    def on_step(step: int, epoch: int, index: int) -> None:
        every = cfg.checkpoint.every
        if every and step % every == 0:
            state = {"step": step, "epoch": epoch, "index": index}
            save_stage_checkpoint(workers, cfg, run_dir, state)

    return on_step


def run_stage_recovering(
    run: Callable[..., Any], cfg: StageConfigBase, workers: Any, run_dir: Path, resume: bool
) -> Any:
    """``run(cfg, workers, run_dir, resume)``; after a lost learner rank the group is
    restarted (``workers.restart()``) and the stage resumes from its newest checkpoint."""
    restarts = 0
    while True:
        try:
            return run(cfg, workers, run_dir, resume=resume)
        except LearnerLostError as exc:
            restarts += 1
            newest = complete_checkpoints(run_dir)
            if not newest:
                raise UserError(
                    f"{exc}, and the stage has no complete checkpoint to restart from: set "
                    "checkpoint.every to let it recover from a lost learner"
                ) from None
            if restarts > cfg.checkpoint.max_restarts or not hasattr(workers, "restart"):
                raise UserError(
                    f"{exc}; the learners were already restarted {restarts - 1} times "
                    "(checkpoint.max_restarts). Resume it with --resume once the cause is fixed."
                ) from None
            print(
                f"[rlhf_ray] {exc}: restarting the learners from {newest[-1]} "
                f"({restarts}/{cfg.checkpoint.max_restarts})",
                flush=True,
            )
            workers.restart()
            resume = True
