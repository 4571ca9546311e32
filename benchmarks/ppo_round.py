"""Benchmark: the real PPO job, end to end, on a private local Ray (or in-process).

What it measures
    Runs ``rlhf_ray.ppo.loop.run_ppo`` on the embedded default config (plus your overrides) with
    ``rlhf_ray.distributed.RayWorkers`` on a local Ray started by this script
    (``num_cpus=2``), writing to a temporary run dir, and prints:

    - Ray start-up (``ray.init``) and actor start-up seconds (``RayWorkers(cfg)``: actors placed,
      process groups joined, engines built, reference weights set);
    - wall time of ``run_ppo`` (initial sync + all rounds + final save) and the sum of
      ``time/round``;
    - mean / median seconds per phase (``time/generate``, ``time/score``, ``time/advantage``,
      ``time/update``, ``time/sync``, ``time/round``) over rounds 1.. (round 0 excluded: warm-up);
    - generated tokens/s (``rollout/tokens_per_s``: valid response tokens / generate seconds);
    - ``rollout/reward_mean`` averaged over the first 5 and the last 5 rounds.

    ``--in-process`` runs the same loop with ``rlhf_ray.workers.inprocess.InProcessWorkers``
    (every role a plain object in this process, one rank per learner group, no Ray), to see
    what the actor system costs or saves.

How to run (from the repository root)
    python benchmarks/ppo_round.py                       # Ray, 30 rounds (the embedded default)
    python benchmarks/ppo_round.py --in-process          # the same without Ray
    python benchmarks/ppo_round.py --rounds 10 rollout.num_workers=1 ppo.epochs=2
    python benchmarks/ppo_round.py --keep-run-dir        # print and keep the run dir

Timings on a loaded 2-core machine are noisy; nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _common
import torch

from rlhf_ray.config.ppo import load_config

PHASES = ["generate", "score", "advantage", "update", "sync", "round"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=30, help="train.rounds (default 30)")
    p.add_argument(
        "--in-process", action="store_true", help="InProcessWorkers instead of Ray actors"
    )
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray (default 2)")
    p.add_argument("--progress", action="store_true", help="print the per-round progress lines")
    p.add_argument("--keep-run-dir", action="store_true", help="keep the temporary run dir")
    p.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    return p.parse_args(argv)


def read_metrics(run_dir: Path) -> list[dict]:
    with (run_dir / "metrics.jsonl").open() as f:
        return [json.loads(line) for line in f if line.strip()]


def summarise(
    rows: list[dict], startup_s: float, run_s: float, ray_init_s: float | None, workers: str
) -> str:
    steady = [r for r in rows if r["round"] > 0] or rows
    lines = []
    head = [(f"start-up: {workers}(cfg)", startup_s)]
    if ray_init_s is not None:
        head.insert(0, ("ray.init (local, private temp dir)", ray_init_s))
    head += [
        ("run_ppo wall (sync 0 + rounds + final save)", run_s),
        ("sum of time/round", sum(r["time/round"] for r in rows)),
        ("time/round of round 0 (warm-up, excluded below)", rows[0]["time/round"]),
    ]
    lines.append(_common.table(["start-up and totals", "seconds"], head))
    lines.append("")
    phase_rows = []
    for phase in PHASES:
        xs = [r[f"time/{phase}"] for r in steady if f"time/{phase}" in r]
        share = (
            _common.mean(xs) / _common.mean([r["time/round"] for r in steady])
            if phase != "round"
            else 1.0
        )
        phase_rows.append(
            (f"time/{phase}", _common.mean(xs), _common.median(xs), f"{100 * share:.0f}%")
        )
    lines.append(
        _common.table(
            [
                f"phase (rounds 1..{rows[-1]['round']}, n={len(steady)})",
                "mean s",
                "median s",
                "of round",
            ],
            phase_rows,
        )
    )
    lines.append("")
    tps = [r["rollout/tokens_per_s"] for r in steady]
    resp = [r["rollout/response_length"] for r in steady]
    first = [r["rollout/reward_mean"] for r in rows[:5]]
    last = [r["rollout/reward_mean"] for r in rows[-5:]]
    kl_last = [r["ppo/kl"] for r in rows[-5:]]
    other = [
        ("rollout/tokens_per_s mean", _common.mean(tps)),
        ("rollout/tokens_per_s median", _common.median(tps)),
        ("rollout/response_length mean (tokens)", _common.mean(resp)),
        ("reward_mean, first 5 rounds", _common.mean(first)),
        ("reward_mean, last 5 rounds", _common.mean(last)),
        ("ppo/kl, last 5 rounds", _common.mean(kl_last)),
    ]
    lines.append(_common.table(["rollout and learning", "value"], other))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    overrides = list(args.overrides) + [
        f"train.rounds={args.rounds}",
        f"logging.progress={'true' if args.progress else 'false'}",
    ]
    cfg = load_config(None, overrides)
    from rlhf_ray.ppo.loop import run_ppo

    mode = "in-process (InProcessWorkers, no Ray)" if args.in_process else "Ray (RayWorkers)"
    _common.banner(f"ppo_round: {args.rounds} PPO rounds, {mode}")
    print(
        f"config: embedded default + {args.overrides or 'no overrides'}; "
        f"policy {cfg.policy.model.preset} h{cfg.policy.model.hidden_size} "
        f"l{cfg.policy.model.num_layers}, {cfg.policy.engine} ZeRO-{cfg.policy.zero_stage} x "
        f"{cfg.policy.num_ranks} ranks, rollout {cfg.rollout.num_workers} workers x "
        f"batch {cfg.rollout.batch_size} x {cfg.rollout.max_new_tokens} new tokens",
        flush=True,
    )
    run_dir = Path(tempfile.mkdtemp(prefix="ppo-bench-")) / "run"
    try:
        if args.in_process:
            from rlhf_ray.workers.inprocess import InProcessWorkers

            print(f"driver torch threads: {torch.get_num_threads()}", flush=True)
            startup, run_s = _timed_run(cfg, lambda: InProcessWorkers(cfg), run_ppo, run_dir)
            ray_init = None
        else:
            from rlhf_ray.distributed import RayWorkers

            with _common.local_ray(args.num_cpus, namespace="rlhf_ray") as ray_init:
                print(f"local Ray up in {ray_init:.1f}s (num_cpus={args.num_cpus})", flush=True)
                startup, run_s = _timed_run(cfg, lambda: RayWorkers(cfg), run_ppo, run_dir)
        rows = read_metrics(run_dir)
        print()
        workers = "InProcessWorkers" if args.in_process else "RayWorkers"
        print(summarise(rows, startup, run_s, ray_init, workers))
        if args.keep_run_dir:
            print(f"\nrun dir kept: {run_dir}")
    finally:
        if not args.keep_run_dir:
            shutil.rmtree(run_dir.parent, ignore_errors=True)


def _timed_run(cfg, make_workers, run_ppo, run_dir: Path) -> tuple[float, float]:
    start = time.perf_counter()
    workers = make_workers()
    startup = time.perf_counter() - start
    print(f"workers up in {startup:.1f}s; running {cfg.train.rounds} rounds ...", flush=True)
    try:
        start = time.perf_counter()
        run_ppo(cfg, workers, run_dir)
        return startup, time.perf_counter() - start
    finally:
        workers.close()


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
