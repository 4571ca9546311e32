"""``rlhf-ray replay RUN --round K``: the train-only split mode, in this process (so a breakpoint
in the learners works; ``rlhf-ray generate`` is its rollout-only sibling).

``replay_round`` rebuilds the policy and value learners from the run's ``config.yaml``, restores
the training state saved before round K (the checkpoint written after round K-1; the initial
weights for K = 0, which a seeded config rebuilds exactly), loads the PPO batch dumped for round
K and runs that round's update again: same batch, same minibatch shuffles (seeded by
``(train.seed, round)``), same optimizer state. Its ``ppo/*`` metrics are then compared with the
round's row of ``metrics.jsonl``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_ray.config import Config, load_config
from rlhf_ray.errors import UserError
from rlhf_ray.metrics import read_metrics
from rlhf_ray.rollout_dump import dump_paths, load_ppo_batch


@dataclass
class ReplayResult:
    round: int
    checkpoint: Path | None  # None: the initial weights (round 0)
    replayed: dict[str, float]  # keyed like metrics.jsonl
    logged: dict[str, Any]  # the round's row of metrics.jsonl ({} if absent)

    def differences(self) -> dict[str, float]:
        """``|replayed - logged|`` for every replayed key the logged row has."""
        out = {}
        for key, value in self.replayed.items():
            logged = self.logged.get(key)
            if isinstance(logged, (int, float)):
                out[key] = abs(value - logged)
        return out


def checkpoint_before(run_dir: Path, round_index: int) -> Path | None:
    """The checkpoint holding the state the learners had when round ``round_index`` began."""
    if round_index == 0:
        return None
    path = run_dir / "checkpoints" / f"round_{round_index - 1:06d}"
    if not (path / "driver_state.json").exists():
        have = sorted(p.name for p in (run_dir / "checkpoints").glob("round_*"))
        raise UserError(
            f"replaying round {round_index} needs the checkpoint saved after round "
            f"{round_index - 1} ({path}), which is not there (checkpoints: "
            f"{', '.join(have) or 'none'}). Run with checkpoint.every=1 (or a K dividing "
            f"{round_index}) and a checkpoint.keep_last that keeps it."
        )
    return path


def _saved_ranks(state_dir: Path) -> int:
    """How many data-parallel ranks wrote a learner's training state (1 for the torch engine)."""
    return max(1, len(list(state_dir.glob("state/zero_pp_rank_*_optim_states.pt"))))


def _check_one_rank(checkpoint: Path) -> None:
    for role in ("policy", "value"):
        ranks = _saved_ranks(checkpoint / f"{role}_state")
        if ranks > 1:
            raise UserError(
                f"{checkpoint} holds the {role} training state of {ranks} ZeRO ranks; replay "
                "trains in one process and DeepSpeed cannot re-partition an optimizer state "
                f"for another number of ranks. Replay runs with {role}.num_ranks=1 (or runs "
                "made with `rlhf-ray ppo --in-process`)."
            )


def replay_round(run_dir: Path, round_index: int) -> ReplayResult:
    """Re-run round ``round_index``'s PPO update in this process (see the module docstring)."""
    from rlhf_ray.workers.inprocess import build_learners

    config_path = run_dir / "config.yaml"
    if not config_path.exists():
        raise UserError(f"{run_dir} is not a run dir (no config.yaml)")
    cfg: Config = load_config(config_path)
    _, batch_path = dump_paths(run_dir, round_index)
    if not batch_path.exists():
        dumped = sorted(p.stem for p in (run_dir / "rollouts").glob("round_*.safetensors"))
        raise UserError(
            f"round {round_index} of {run_dir} was not dumped ({batch_path} is missing; dumped: "
            f"{', '.join(dumped) or 'none'}). Run with logging.dump_rollouts_every=K: rounds "
            "with round % K == 0 are dumped."
        )
    checkpoint = checkpoint_before(run_dir, round_index)
    if checkpoint is not None:
        _check_one_rank(checkpoint)
    batch, _ = load_ppo_batch(batch_path)

    policy, value = build_learners(cfg)
    if checkpoint is not None:
        policy.load_state(str(checkpoint / "policy_state"))
        if value is not None:
            value.load_state(str(checkpoint / "value_state"))
    # the update of the round, as InProcessWorkers.update runs it (a breakpoint here works)
    value_stats = value.train(batch, round_index) if value is not None else {}  # no critic
    stats = {**policy.train(batch, round_index), **value_stats}
    replayed = {"round": round_index, **{f"ppo/{k}": v for k, v in stats.items()}}
    logged = next(
        (row for row in read_metrics(run_dir / "metrics.jsonl") if row["round"] == round_index),
        {},
    )
    return ReplayResult(round_index, checkpoint, replayed, logged)


def format_comparison(result: ReplayResult, atol: float) -> tuple[str, bool]:
    """A table of replayed vs logged ``ppo/*`` metrics; True if all agree within ``atol``."""
    diffs = result.differences()
    lines = [f"{'metric':<22} {'logged':>14} {'replayed':>14} {'|diff|':>10}"]
    for key, value in result.replayed.items():
        if key == "round":
            continue
        logged = result.logged.get(key)
        shown = f"{logged:>14.8f}" if isinstance(logged, (int, float)) else f"{'-':>14}"
        diff = f"{diffs[key]:>10.2e}" if key in diffs else f"{'-':>10}"
        lines.append(f"{key:<22} {shown} {value:>14.8f} {diff}")
    same = bool(diffs) and all(d <= atol for d in diffs.values())  # NaN never agrees
    return "\n".join(lines), same


def replay_json(result: ReplayResult) -> str:
    return json.dumps(result.replayed)
