"""Benchmark: what a Ray actor costs a two-thread torch step on a small CPU machine.

What it measures
    One forward and backward of SmolLM2-135M-Instruct (float32) on 8 x 88 tokens, the shape
    of a micro-batch of ``jobs/arithmetic_cpu.yaml``'s update, timed ``--repeats`` times:

    plain      in a plain process with two torch threads
    actor      in a lone Ray actor of 1 CPU resized to two threads (``set_num_threads``, as
               ``cluster.phase_threads`` does; ``rlhf_ray/distributed/threads.py``)
    + N idle   the same actor beside N idle actors that each hold the model (the other roles
               of a run, waiting for their phase)

    A gap between the rows would be what the actor, or the node's other processes, cost an
    OpenMP team that needs both cores. README "Speed" compares it with the Ray round's update
    (on 2 idle cores: 3.97, 3.91 and 3.97 s, no gap).

Output
    A table of the median step per setup (the first step is a warm-up), then ONE JSON line.

How to run (from the repository root; the first run fetches and converts the model, ~80 s)
    python benchmarks/actor_overhead.py
    python benchmarks/actor_overhead.py --idle 3 --repeats 6
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import banner, local_ray, median, table  # noqa: E402

MODEL = "builtin:smollm2-135m-instruct"
ROWS, TOKENS = 8, 88


def load_model(path: str):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(path)


def steps(path: str, repeats: int) -> list[float]:
    """Seconds of each forward + backward (the first one warms up)."""
    model = load_model(path)
    ids = torch.randint(0, model.config.vocab_size, (ROWS, TOKENS), generator=torch.Generator())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(ids, labels=ids).loss.backward()
        times.append(time.perf_counter() - start)
    return times


class Stepper:
    def __init__(self, threads: int):
        torch.set_num_threads(threads)

    def run(self, path: str, repeats: int) -> list[float]:
        return steps(path, repeats)


class Idle:
    def __init__(self, path: str):
        self.model = load_model(path)

    def ping(self) -> bool:
        return True


def on_ray(path: str, repeats: int, idle: int) -> list[float]:
    import ray

    with local_ray(num_cpus=2):
        one = {"env_vars": {"OMP_NUM_THREADS": "1"}}
        idlers = [
            ray.remote(Idle).options(num_cpus=0.25, runtime_env=one).remote(path)
            for _ in range(idle)
        ]
        ray.get([i.ping.remote() for i in idlers])
        actor = ray.remote(Stepper).options(num_cpus=1, runtime_env=one).remote(2)
        return ray.get(actor.run.remote(path, repeats))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--idle", type=int, default=3, help="idle actors beside the last row")
    args = parser.parse_args(argv)
    from rlhf_ray.models.sources import resolve_model_source

    path = str(resolve_model_source(MODEL))
    banner("a two-thread torch step: plain process, Ray actor, Ray actor beside idle actors")
    torch.set_num_threads(2)
    results = {
        "plain": steps(path, args.repeats),
        "actor": on_ray(path, args.repeats, 0),
        f"actor + {args.idle} idle": on_ray(path, args.repeats, args.idle),
    }
    medians = {name: median(times[1:] or times) for name, times in results.items()}
    base = medians["plain"]
    print(table(["setup", "s per step", "/ plain"], [[n, m, m / base] for n, m in medians.items()]))
    print(json.dumps({"median_s": medians, "steps_s": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
