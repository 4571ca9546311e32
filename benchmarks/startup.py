"""Benchmark: how long the default ``rlhf-ray ppo`` takes to start and to finish.

What it measures
    Launches the default ``rlhf-ray ppo`` (the embedded config, nothing made smaller) as a user
    does: a new Python process, a local Ray in a private temp dir. It prints the seconds from
    launch to the first row of ``metrics.jsonl`` and to the end of the process, and where the
    start-up went, from marks the child process records around the steps of ``cmd_ppo``:

      imports            launch -> the CLI module imported (torch, transformers, pydantic ...)
      ray up             ``connect``: the local Ray started
      actors alive       every actor constructed (each a process: imports, model build)
      learners set up    rendezvous and the DeepSpeed engines
      reference loaded   the reference scorer's weights streamed from policy rank 0 (the
                         end of the ``RayWorkers`` construction)
      first row          the first round (with the first sync) and its metrics row
      models saved       the last round, then ``RUN/policy`` and ``RUN/value`` written
      actors stopped     ``RayWorkers.close``: every actor and placement group gone
      ray down           ``disconnect``: the local Ray stopped; then the summary and exit

    It also prints the CPU seconds of all the run's processes (the driver, Ray's and the
    actors': the launched process and every descendant, sampled every 0.1 s with psutil),
    at the first row and at the end: less disturbed by other work than wall time, and on 2
    idle cores the wall time cannot be below half of it.

    The marks wrap functions of ``rlhf_ray.distributed.runtime`` in the child only; the run
    itself is the product's.

How to run (from the repository root)
    python benchmarks/startup.py              # one run
    python benchmarks/startup.py --repeats 3  # median of three

Timings on a 2-core machine shared with other work are disturbed: report the load average
printed with them. Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

MARK = "[startup] "


def _child(launched: float) -> int:
    """In the launched process: mark the steps, then run the CLI as ``rlhf-ray ppo`` does."""

    def mark(name: str) -> None:
        print(f"{MARK}{name} {time.time() - launched:.2f}", file=sys.stderr, flush=True)

    from rlhf_ray import cli
    from rlhf_ray.distributed import cluster, runtime

    mark("imports")

    def after(owner: object, attr: str, name: str) -> None:
        original = getattr(owner, attr)

        @functools.wraps(original)
        def wrapped(*args, **kwargs):
            out = original(*args, **kwargs)
            mark(name)
            return out

        setattr(owner, attr, wrapped)

    after(cluster, "connect", "ray_up")
    after(runtime, "wait_ready", "actors_alive")
    after(runtime.RayWorkers, "_start_learners", "learners_set_up")
    after(runtime.RayWorkers, "__init__", "reference_loaded")
    from rlhf_ray import driver

    after(driver, "save_model_dirs", "models_saved")
    after(runtime.RayWorkers, "close", "actors_stopped")
    after(cluster, "disconnect", "ray_down")
    import rlhf_ray.distributed as package

    package.connect, package.disconnect = cluster.connect, cluster.disconnect  # cli.open_workers
    return cli.main(sys.argv[2:])


class TreeCPU:
    """CPU seconds used so far by a process and all its descendants (the last sample of each
    process is kept after it exits)."""

    def __init__(self, pid: int):
        self.root, self.seen = psutil.Process(pid), dict[int, float]()
        self.names: dict[int, str] = {}

    def sample(self) -> float:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            procs = []
        for proc in procs:
            try:
                times = proc.cpu_times()
                self.seen[proc.pid] = times.user + times.system
                known = self.names.get(proc.pid, "")
                if not known.startswith("ray::") or known == "ray::IDLE":  # until it is named
                    self.names[proc.pid] = _short(proc.cmdline())
            except psutil.Error:
                pass
        return sum(self.seen.values())

    def by_process(self) -> dict[str, float]:
        """CPU seconds per kind of process (actors by class, Ray's daemons by program)."""
        out: dict[str, float] = {}
        for pid, seconds in self.seen.items():
            name = self.names.get(pid, "?")
            out[name] = out.get(name, 0.0) + seconds
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _short(cmdline: list[str]) -> str:
    """``ray::PolicyLearner`` for an actor, the program's name for anything else."""
    if cmdline and cmdline[0].startswith("ray::"):  # ray::Class.method while a call runs
        return cmdline[0].split()[0].split(".")[0]
    words = [w for w in cmdline if not w.startswith("-")]
    for word in words[1:] if words and "python" in words[0] else words:
        return Path(word).name
    return "?"


def run_once(workdir: Path) -> dict[str, float]:
    """One default run in a new process; the marks and the first-row / end times (s)."""
    run_dir = workdir / "run"
    ray_tmp = tempfile.mkdtemp(prefix="rr-", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    launched = time.time()
    env["STARTUP_LAUNCHED"] = repr(launched)
    args = [sys.executable, __file__, "--child", "ppo", "--run-dir", str(run_dir)]
    proc = subprocess.Popen(args, cwd=workdir, env=env, stderr=subprocess.PIPE, text=True)
    first_row = first_row_cpu = None
    at_first_row: dict[str, float] = {}
    tree = TreeCPU(proc.pid)
    marks: dict[str, float] = {}

    def read_stderr() -> None:  # marks are ours; everything else is the run's console
        for line in proc.stderr:
            if line.startswith(MARK):
                name, seconds = line[len(MARK) :].split()
                marks[name] = float(seconds)
            else:
                sys.stderr.write(line)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    while proc.poll() is None:
        metrics = run_dir / "metrics.jsonl"
        cpu = tree.sample()
        if first_row is None and metrics.exists() and metrics.read_text().strip():
            first_row, first_row_cpu = time.time() - launched, cpu
            at_first_row = tree.by_process()
        time.sleep(0.1)
    end = time.time() - launched
    reader.join(timeout=5)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"the run failed (exit {proc.returncode})")
    print(
        "CPU seconds by process at the first row: "
        + ", ".join(
            f"{name} {seconds:.1f}" for name, seconds in at_first_row.items() if seconds >= 0.3
        )
    )
    out = {**marks, "first_row": first_row or end, "end": end, "cpu": cpu}
    return {**out, "cpu_first_row": first_row_cpu or cpu}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(_child(float(os.environ["STARTUP_LAUNCHED"])))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=1, help="runs; the median is printed")
    args = parser.parse_args()
    runs = []
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            runs.append(run_once(Path(tmp)))
        print(f"run {i}: {json.dumps({k: round(v, 2) for k, v in runs[-1].items()})}")
    order = ["imports", "ray_up", "actors_alive", "learners_set_up", "reference_loaded"]
    order += ["first_row", "models_saved", "actors_stopped", "ray_down", "end"]
    print(f"load average {os.getloadavg()[0]:.1f} (2 idle cores: about 0)")
    print(f"{'step':<18} {'at (s)':>8} {'took (s)':>9}")
    previous = 0.0
    for name in order:
        at = statistics.median(r[name] for r in runs if name in r)
        print(f"{name:<18} {at:8.1f} {at - previous:9.1f}")
        previous = at
    print(
        f"first metrics row after {statistics.median(r['first_row'] for r in runs):.1f} s; "
        f"whole run {statistics.median(r['end'] for r in runs):.1f} s; CPU seconds of the "
        f"run's processes: {statistics.median(r['cpu_first_row'] for r in runs):.1f} by the "
        f"first row, {statistics.median(r['cpu'] for r in runs):.1f} in all"
    )


if __name__ == "__main__":
    main()
