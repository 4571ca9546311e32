"""Benchmark: where a real-model round's time goes, by function, per training engine.

What it measures
    ``jobs/arithmetic_cpu.yaml`` with micro-batches of 8 (``benchmarks/hand_loop.py``'s round)
    in process, once per engine (``--engines``): the workers are built first, then
    ``run_ppo`` runs ``--rounds`` rounds (its initial sync and final save included) under
    cProfile. Each engine's table, the functions by own time and by cumulative time, goes to
    ``DIR/profile_<engine>.txt`` with the load average it was taken at; a short summary of the
    functions that tell the engines apart (the optimizer step, DeepSpeed's gradient buffers,
    the LM head, the log-softmax) is printed.

How to run (from the repository root)
    python benchmarks/profile_round.py --rounds 2 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import pstats
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import banner  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WATCH = ("step", "backward", "linear", "log_softmax", "reduce", "copy", "clip", "bmm", "adamw")


def profile_engine(engine: str, rounds: int) -> pstats.Stats:
    from rlhf_ray.config.ppo import load_config
    from rlhf_ray.models.sources import resolve_models
    from rlhf_ray.ppo.loop import run_ppo
    from rlhf_ray.workers.inprocess import InProcessWorkers

    overrides = [f"policy.engine={engine}", "ppo.micro_batch_size=8", f"train.rounds={rounds}"]
    overrides += ["checkpoint.every=0", "logging.progress=false"]
    cfg = resolve_models(load_config(str(REPO / "jobs" / "arithmetic_cpu.yaml"), overrides))
    workers = InProcessWorkers(cfg)
    prof = cProfile.Profile()
    prof.enable()
    run_ppo(cfg, workers, Path(tempfile.mkdtemp(prefix=f"profile-{engine}-")))
    prof.disable()
    workers.close()
    del workers
    gc.collect()  # the next engine's models in place of these
    return pstats.Stats(prof)


def write_table(stats: pstats.Stats, path: Path, rounds: int) -> None:
    out = io.StringIO()
    stats.stream = out  # type: ignore[attr-defined]
    out.write(f"{rounds} rounds in process; load average {os.getloadavg()[0]:.2f}\n")
    out.write("== by own time\n")
    stats.sort_stats("tottime").print_stats(35)
    out.write("== by cumulative time\n")
    stats.sort_stats("cumulative").print_stats(60)
    path.write_text(out.getvalue())


def summary(engine: str, stats: pstats.Stats) -> None:
    """The functions whose name holds a watched word, by own time, above 0.2 s."""
    raw: dict = stats.stats  # type: ignore[attr-defined]
    rows = []
    for (file, _, name), (_, _, own, cum, _) in raw.items():
        if own > 0.2 and any(w in name.lower() for w in WATCH):
            rows.append((own, cum, f"{Path(file).name}:{name}"))
    print(f"-- {engine}: own s, cumulative s, function")
    for own, cum, where in sorted(rows, reverse=True)[:12]:
        print(f"   {own:8.2f} {cum:8.2f}  {where}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--engines", default="torch,deepspeed")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    banner("a real-model round by function, per engine")
    args.out.mkdir(parents=True, exist_ok=True)
    for engine in args.engines.split(","):
        stats = profile_engine(engine, args.rounds)
        write_table(stats, args.out / f"profile_{engine}.txt", args.rounds)
        summary(engine, stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
