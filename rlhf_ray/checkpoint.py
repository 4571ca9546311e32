"""Checkpoints and exact resume.

A checkpoint is ``RUN/checkpoints/round_XXXXXX/`` holding the policy and critic in Hugging Face
format (``policy/`` with its tokenizer, ``value/``), the learners' training state
(``policy_state/``, ``value_state/``: weights and optimizer, ZeRO-partitioned per rank under
DeepSpeed), ``driver_state.json`` (round, prompt-sampler cursor, KL coefficient, running score statistics) and the
resolved ``config.yaml``. It is written to a temp dir and renamed when complete, so resume never
picks a half checkpoint. No RNG state is needed: sampling seeds and minibatch shuffles derive
from ``(train.seed, round)``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from rlhf_ray.config import Config, to_yaml
from rlhf_ray.errors import UserError
from rlhf_ray.tokenization import Tokenizer
from rlhf_ray.workers.interface import Workers

# settings a resumed run may change: they do not alter what it computes
RESUMABLE_CHANGES = ("train.rounds", "checkpoint.", "logging.", "cluster.", "rollout.num_workers",
                     "num_cpus", "num_gpus", "train.dist_timeout_s")  # fmt: skip


def save_model_dirs(workers: Workers, tokenizer: Tokenizer, directory: Path) -> None:
    """``policy/`` (with the tokenizer) and ``value/`` in Hugging Face format."""
    workers.save(directory)
    tokenizer.save(directory / "policy")


def save_checkpoint(
    workers: Workers, tokenizer: Tokenizer, cfg: Config, run_dir: Path, state: dict[str, Any]
) -> Path:
    """Write ``checkpoints/round_XXXXXX`` atomically and keep the last ``keep_last``."""
    root = run_dir / "checkpoints"
    final = root / f"round_{state['round']:06d}"
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model_dirs(workers, tokenizer, tmp)
    workers.save_state(tmp)
    (tmp / "config.yaml").write_text(to_yaml(cfg))
    (tmp / "driver_state.json").write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(root.glob("round_*"))[: -cfg.checkpoint.keep_last]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (temp dirs of an interrupted save are ignored)."""
    done = sorted(p for p in (run_dir / "checkpoints").glob("round_*")
                  if (p / "driver_state.json").exists())  # fmt: skip
    return done[-1] if done else None


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resumable(checkpoint: Path, cfg: Config) -> None:
    """Refuse to resume with settings that change what the run computes."""
    old = _flatten(yaml.safe_load((checkpoint / "config.yaml").read_text()))
    new = _flatten(cfg.model_dump(mode="json"))
    changed = sorted(
        key for key in old.keys() | new.keys()
        if old.get(key) != new.get(key) and not any(p in key for p in RESUMABLE_CHANGES)
    )  # fmt: skip
    if changed:
        shown = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in changed[:5])
        raise UserError(
            f"cannot resume from {checkpoint}: the config differs in {shown}; resume with the "
            "config the run was started with (config.yaml in the checkpoint)"
        )


def truncate_metrics(path: Path, last_round: int) -> None:
    """Drop metric rows of rounds after the checkpoint (the resumed run writes them again)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["round"] <= last_round]  # fmt: skip
    path.write_text("".join(row + "\n" for row in rows))
