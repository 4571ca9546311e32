"""``rlhf-ray replay RUN --round K``: the train-only split mode, in this process (so a breakpoint
in the learners works; ``rlhf-ray generate`` is its rollout-only sibling).

``replay_round`` rebuilds the policy and value learners from the run's ``config.yaml``, restores
the training state saved before round K (the checkpoint written after round K-1; the initial
weights for K = 0, which a seeded config rebuilds exactly), loads the PPO batch dumped for round
K and runs that round's update again: same batch, same minibatch shuffles (seeded by
``(train.seed, round)``), same optimizer state. Its ``ppo/*`` metrics are then compared with the
round's row of ``metrics.jsonl``.

A learner trained on N ranks (``num_ranks``, any ZeRO stage) is replayed on N ranks joined in
one gloo process group on this machine: rank 0 trains in this process (a breakpoint in the
learners stops there), ranks 1..N-1 in spawned processes, and each rank restores its own ZeRO
partition of the optimizer state. The value learner is replayed first, then the policy, each in
its own group, as on Ray.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_ray.config.ppo import Config, has_critic, load_config
from rlhf_ray.errors import UserError
from rlhf_ray.observe.metrics import read_metrics
from rlhf_ray.ppo.dumps import dump_paths, load_ppo_batch
from rlhf_ray.workers.interface import mean_stats


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
    """How many data-parallel ranks wrote a learner's training state (1 for the torch engine):
    one ``zero_pp_rank_R_..._optim_states.pt`` each (``bf16_zero_pp_rank_R_...`` in bf16)."""
    return max(1, len(list(state_dir.glob("state/*zero_pp_rank_*_optim_states.pt"))))


def roles_and_ranks(cfg: Config, checkpoint: Path | None, on_ray: bool) -> dict[str, int]:
    """Each learner the replay trains, with the ranks the run trained it on (its
    ``num_ranks`` on Ray; one in-process), checked against the ranks that saved its state in
    ``checkpoint``."""
    roles = {"policy": cfg.policy.num_ranks if on_ray else 1}
    if has_critic(cfg):
        roles["value"] = cfg.value.num_ranks if on_ray else 1
    for role, world in roles.items() if checkpoint is not None else ():
        saved = _saved_ranks(checkpoint / f"{role}_state")
        if saved > 1 and saved != world:
            raise UserError(
                f"{checkpoint} holds the {role} training state of {saved} ZeRO ranks but the "
                f"run trained it on {world} (its config.yaml and metrics.jsonl): replay "
                "restores the state on the ranks that saved it; use the run's own files"
            )
    return roles


def _train_rank(
    cfg: Config,
    role: str,
    checkpoint: Path | None,
    batch_path: Path,
    round_index: int,
    on_ray: bool,
    rank: int,
    world: int,
    port: int,
) -> dict[str, float]:
    """One rank of ``role``: join the group, restore its state, run the round's update as the
    learner does on Ray; returns this rank's stats."""
    from rlhf_ray.workers.inprocess import build_learner

    role_cfg = cfg.policy if role == "policy" else cfg.value
    # a rank on Ray runs as many torch threads as its CPU share (distributed/runtime.py); the
    # count changes float rounding, and so, rarely, a clip fraction
    threads = max(1, int(role_cfg.num_cpus_per_rank)) if on_ray else None
    learner = build_learner(cfg, role, rank, world, threads)
    if learner.engine_name == "deepspeed":
        learner.init_process_group("127.0.0.1", port, cfg.train.dist_timeout_s)
    learner.setup()
    if checkpoint is not None:
        learner.load_state(str(checkpoint / f"{role}_state"))
    batch, _ = load_ppo_batch(batch_path)
    # the update of the round (on rank 0 this runs in the foreground: a breakpoint here works)
    return learner.train(batch, round_index)


def _peer(queue: Any, *args: Any) -> None:
    """A rank other than 0, in a spawned process: its stats (or its error) go to ``queue``."""
    rank = args[6]
    try:
        queue.put((rank, _train_rank(*args)))
    except BaseException as exc:
        queue.put((rank, f"{type(exc).__name__}: {exc}"))
        raise


def _leave_group(dist: Any) -> None:
    """Leave the process group, so that the next learner joins its own (of its own size)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    from deepspeed.utils import groups

    # DeepSpeed keeps a clone of the first world group it saw (deepspeed/utils/groups.py):
    # forget it, or the next group's engines would use the destroyed one
    groups._WORLD_GROUP = None


def _train_all_ranks(
    cfg: Config,
    role: str,
    world: int,
    checkpoint: Path | None,
    batch_path: Path,
    round_index: int,
    on_ray: bool,
) -> dict[str, float]:
    """The round's update of ``role`` on ``world`` ranks joined in one process group on this
    machine: rank 0 in this process, ranks 1.. in spawned processes; stats averaged over ranks
    (as ``RayWorkers.update`` does). The group is left again at the end."""
    import multiprocessing
    import os

    import torch.distributed as dist

    from rlhf_ray.engines.training import free_port

    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the spawned ranks inherit it
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    args = (cfg, role, checkpoint, batch_path, round_index, on_ray)
    peers = [
        context.Process(target=_peer, args=(queue, *args, rank, world, port), daemon=True)
        for rank in range(1, world)
    ]
    for peer in peers:
        peer.start()
    try:
        results = {0: _train_rank(*args, 0, world, port)}
        for _ in peers:
            rank, result = queue.get(timeout=cfg.train.dist_timeout_s)
            if isinstance(result, str):
                raise UserError(f"replay: {role} rank {rank} failed: {result}")
            results[rank] = result
    finally:
        for peer in peers:
            peer.join(timeout=60)
            if peer.is_alive():
                peer.kill()
        _leave_group(dist)
    return mean_stats([results[r] for r in range(world)])


def replay_round(run_dir: Path, round_index: int) -> ReplayResult:
    """Re-run round ``round_index``'s PPO update in this process (see the module docstring)."""
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
    logged = next(
        (row for row in read_metrics(run_dir / "metrics.jsonl") if row["round"] == round_index),
        {},
    )
    on_ray = "train/learner_restarts" in logged  # what the Ray runtime logs, in-process not
    stats: dict[str, float] = {}
    for role, world in reversed(roles_and_ranks(cfg, checkpoint, on_ray).items()):  # value first
        args = (cfg, role, world, checkpoint, batch_path, round_index, on_ray)
        stats = {**_train_all_ranks(*args), **stats}
    replayed = {"round": round_index, **{f"ppo/{k}": v for k, v in stats.items()}}
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
