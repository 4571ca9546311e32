"""Checkpoints and exact resume.

A checkpoint is ``RUN/checkpoints/round_XXXXXX/`` holding the policy and critic in Hugging Face
format (``policy/`` with its tokenizer, ``value/``), the learners' training state
(``policy_state/``, ``value_state/``: weights and optimizer, ZeRO-partitioned per rank under
DeepSpeed), ``driver_state.json`` (round, prompt-sampler cursor, KL coefficient, running
score statistics) and the resolved ``config.yaml``. It is written to a temp dir, every file fsynced, and renamed into place
when complete; only then are older checkpoints removed. Resume picks the newest directory that
holds every part, so a checkpoint cut off mid-write is never picked. No RNG state is needed:
sampling seeds and minibatch shuffles derive from ``(train.seed, round)``. A critic-free run
(``algo.estimator`` not gae) has no ``value`` parts.

Our own state is JSON or safetensors. DeepSpeed's optimizer files (``*_optim_states.pt``) are
pickles: load checkpoints only from a source you trust.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from rlhf_ray.config.ppo import Config, to_yaml
from rlhf_ray.data.tokenization import Tokenizer
from rlhf_ray.errors import UserError
from rlhf_ray.workers.interface import Workers

# Settings a resumed run may change: exact keys, each one that does not alter what the run
# computes (how long it runs, where and with which resources, what it reports, how long it
# waits). Anything else, including a setting added later and not listed here, is refused.
RESUMABLE_CHANGES = frozenset(
    {
        "train.rounds",
        "train.dist_timeout_s",
        "train.phase_timeout_s",
        "train.max_restarts",
        "train.max_bad_steps",
        "checkpoint.every",
        "checkpoint.keep_last",
        "logging.progress",
        "logging.tensorboard",
        "logging.wandb",
        "logging.wandb_project",
        "logging.wandb_mode",
        "logging.wandb_dir",
        "logging.dump_rollouts_every",
        "sync.max_logprob_diff",
        "rollout.max_logprob_gap",
        "cluster.nodes",
        "cluster.num_cpus",
        "cluster.namespace",
        "cluster.actor_start_timeout_s",
        "cluster.learner_resources",
        "cluster.spread",
        "rollout.num_workers",
        "rollout.num_cpus_per_worker",
        "policy.num_cpus_per_rank",
        "value.num_cpus_per_rank",
        "reference.num_cpus",
        "reward.num_cpus",
        "data.on_bad_row",
    }
)

# the parts of a complete checkpoint (driver_state.json is written last)
CHECKPOINT_PARTS = (
    "policy",
    "value",
    "policy_state",
    "value_state",
    "config.yaml",
    "driver_state.json",
)


def save_model_dirs(
    workers: Workers, tokenizer: Tokenizer, directory: Path, merged: bool = True
) -> None:
    """``policy/`` (with the tokenizer) and, with a critic, ``value/`` in Hugging Face format.
    A LoRA learner writes its adapter to ``<role>/adapter`` and, when ``merged``, the merged
    model beside it (a checkpoint holds only the adapter: what changes)."""
    workers.save(directory, merged)
    tokenizer.save(directory / "policy")


def save_checkpoint(
    workers: Workers, tokenizer: Tokenizer, cfg: Config, run_dir: Path, state: dict[str, Any]
) -> Path:
    """Write ``checkpoints/round_XXXXXX`` atomically, then keep the last ``keep_last``.

    The new checkpoint is complete, fsynced and renamed into place before any old one is
    removed: a crash at any point leaves at least one complete checkpoint."""
    root = run_dir / "checkpoints"
    final = root / f"round_{state['round']:06d}"
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model_dirs(workers, tokenizer, tmp, merged=False)
    workers.save_state(tmp)
    (tmp / "config.yaml").write_text(to_yaml(cfg))
    (tmp / "driver_state.json").write_text(json.dumps(state))
    publish_checkpoint(tmp, final)
    for old in complete_checkpoints(run_dir)[: -cfg.checkpoint.keep_last]:
        shutil.rmtree(old)
    return final


def publish_checkpoint(tmp: Path, final: Path) -> None:
    """Make the written ``tmp`` the checkpoint ``final``: fsynced, then renamed into place. The
    same checkpoint saved again (after a restart) is swapped in before the old copy goes."""
    fsync_tree(tmp)
    replaced = final.parent / f".old-{final.name}"
    if final.exists():
        shutil.rmtree(replaced, ignore_errors=True)
        final.rename(replaced)
    tmp.rename(final)
    fsync_dir(final.parent)
    shutil.rmtree(replaced, ignore_errors=True)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` to disk (a rename is only as durable
    as what it renames)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb+") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


CRITIC_PARTS = ("value", "value_state")  # absent when algo.estimator is critic-free


def expected_parts(checkpoint: Path) -> list[str]:
    """The parts a complete ``checkpoint`` holds: no ``value`` parts when the config saved in it
    has a critic-free estimator (read once that config is there)."""
    config = checkpoint / "config.yaml"
    algo = (yaml.safe_load(config.read_text()).get("algo") or {}) if config.exists() else {}
    critic = algo.get("estimator", "gae") == "gae"
    return [p for p in CHECKPOINT_PARTS if critic or p not in CRITIC_PARTS]


def is_complete(checkpoint: Path) -> bool:
    """Every part is there (a directory cut off mid-write misses some)."""
    return checkpoint.is_dir() and all(
        (checkpoint / p).exists() for p in expected_parts(checkpoint)
    )


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of ``run_dir``, oldest first (temp dirs of a save are ignored)."""
    return sorted(p for p in (run_dir / "checkpoints").glob("round_*") if is_complete(p))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def _flatten(tree: dict[str, Any], model: type[BaseModel] = Config, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` along the config's sections; a setting whose value
    is itself a mapping (``cluster.learner_resources``) stays one key."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        field = model.model_fields.get(key)
        sub = field.annotation if field is not None else None
        if isinstance(value, dict) and isinstance(sub, type) and issubclass(sub, BaseModel):
            out.update(_flatten(value, sub, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resumable(checkpoint: Path, cfg: Config) -> None:
    """Refuse to resume with settings that change what the run computes."""
    old = _flatten(yaml.safe_load((checkpoint / "config.yaml").read_text()))
    new = _flatten(cfg.model_dump(mode="json"))
    changed = sorted(
        key
        for key in old.keys() | new.keys()
        if old.get(key) != new.get(key) and key not in RESUMABLE_CHANGES
    )
    if changed:
        shown = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in changed[:5])
        raise UserError(
            f"cannot resume from {checkpoint}: the config differs in {shown}; resume with the "
            "config the run was started with (config.yaml in the checkpoint)"
        )


def truncate_metrics(path: Path, last_round: int, key: str = "round") -> None:
    """Drop metric rows of rounds after the checkpoint (the resumed run writes them again), and
    a torn last line (the driver was killed mid-write). A bad line elsewhere is refused. The
    stages key their rows by ``step``."""
    if not path.exists():
        return
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                print(f"[rlhf_ray] {path}: dropping a torn last line", flush=True)
                break
            raise UserError(
                f"cannot resume: {path}, line {number} is not valid JSON (only a torn last line "
                "is dropped); fix or remove that line"
            ) from None
        if row[key] <= last_round:
            rows.append(line)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write("".join(row + "\n" for row in rows))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
