"""Benchmark: one PPO round on the real model (SmolLM2-135M-Instruct), per phase, for the HF and
vLLM rollout backends, in process and on a local Ray, with each role's peak memory beside
``rlhf-ray plan``'s estimate.

What it measures
    ``jobs/arithmetic_cpu.yaml`` as shipped (GRPO, 8 prompts x 4 samples, 24 new tokens, one
    torch-engine policy rank, a reference, the arithmetic reward, one rollout worker), run for
    ``--rounds`` rounds (default 3) by the CLI, once per setup. The first round warms up (lazy
    kernels, the allocator, vLLM's first-call compile); the table gives the median of the rounds
    after it: seconds per phase (``time/*`` of ``metrics.jsonl``), the round, and the rollout's
    tokens/s. Start-up (process start to the first metrics row) is its own column.

    Memory: every process of the run is sampled every 10 ms for its anonymous resident memory
    (``RssAnon``: its own heap, not shared libraries or the object store). On Ray each actor is
    told apart by its process title (``ray::PolicyLearner``, ``ray::ReferenceScorer``, ...);
    the figure is its peak minus the same process's first sample (the bare worker, before it
    imports torch), so the imports (~0.4 GB: torch, transformers) count, as they do on a real
    machine. Beside it: plan's per-role estimate (``rlhf_ray.models.memory.role_memory``: model
    states plus activations / KV cache), and the ratio. In process all roles share one
    process: its peak is given against the sum of the estimates.

Output
    A table per setup, then ONE JSON line with every figure.

How to run (from the repository root; the first run fetches and converts the model, ~80 s)
    python benchmarks/real_round.py                       # hf and vllm, in process and on Ray
    python benchmarks/real_round.py --backends hf --placements inprocess --rounds 4
    python benchmarks/real_round.py --placements inprocess \
        --set policy.lora.r=16 --set reference.from_policy_base=true   # a LoRA policy
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import banner, median, table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "jobs" / "arithmetic_cpu.yaml"
PHASES = ("generate", "score", "advantage", "update", "sync", "round")
SAMPLE_S = 0.01  # short-lived peaks (a chunk of logits) last tens of ms
ROLES = {  # process title prefix -> plan's role
    "ray::PolicyLearner": "policy",
    "ray::ReferenceScorer": "reference",
    "ray::RewardScorer": "reward",
    "ray::TextRewardScorer": "reward",
    "ray::RolloutGenerator": "rollout",
    "ray::VLLMRolloutGenerator": "rollout",
}


def rss_anon(proc: psutil.Process) -> int:
    try:
        with open(f"/proc/{proc.pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def role_of(proc: psutil.Process) -> str | None:
    try:
        title = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    for prefix, role in ROLES.items():
        if title.startswith(prefix):
            return role
    return None


class Sampler:
    """Peak ``RssAnon`` above each process's first sample, per role, while a run is alive."""

    def __init__(self, root: psutil.Process, in_process: bool) -> None:
        self.root, self.in_process = root, in_process
        self.first: dict[int, int] = {}
        self.peak: dict[str, int] = {}
        self.base: dict[str, int] = {}  # each role's first sample
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        procs: list[psutil.Process] = []
        next_scan = 0.0
        while not self.stop.is_set():
            if time.monotonic() >= next_scan:  # new processes: once a second
                procs = self._processes()
                next_scan = time.monotonic() + 1.0
            for proc in procs:
                role = "all" if self.in_process and proc.pid == self.root.pid else role_of(proc)
                if role is None:
                    continue
                now = rss_anon(proc)
                base = self.first.setdefault(proc.pid, now)
                self.base.setdefault(role, base)
                self.peak[role] = max(self.peak.get(role, 0), now - base)
            time.sleep(SAMPLE_S)

    def _processes(self) -> list[psutil.Process]:
        procs = [self.root]
        with contextlib.suppress(psutil.NoSuchProcess):
            procs += self.root.children(recursive=True)
        if not self.in_process:  # Ray's workers are children of its raylet, not of the CLI
            procs += [p for p in psutil.process_iter() if role_of(p)]
        return procs

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def plan_estimates(backend: str, overrides: Sequence[str] = ()) -> dict[str, float]:
    """plan's GB per role for the benchmarked config (with ``overrides``, as the run gets)."""
    from rlhf_ray.config.ppo import load_config
    from rlhf_ray.models.memory import Estimate, role_memory
    from rlhf_ray.models.sources import resolve_models

    cfg = resolve_models(load_config(str(CONFIG), [f"rollout.backend={backend}", *overrides]))
    out = {}
    for role, est in role_memory(cfg).items():
        if isinstance(est, Estimate):
            out[role] = est.total / 2**30
    return out


def run_setup(
    backend: str,
    placement: str,
    rounds: int,
    overrides: Sequence[str] = (),
    repo: Path = REPO,
) -> dict:
    """``repo``: the source tree whose ``rlhf_ray`` and config run (another checkout: before /
    after figures from one script run)."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"real-{backend}-{placement}-"))
    config = repo / CONFIG.relative_to(REPO)
    cmd = [sys.executable, "-m", "rlhf_ray.cli", "ppo", "--config", str(config)]
    cmd += ["--in-process"] if placement == "inprocess" else []
    cmd += ["--run-dir", str(run_dir), f"rollout.backend={backend}", f"train.rounds={rounds}"]
    cmd += ["checkpoint.every=0", "logging.progress=false", *overrides]
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    first_row = None
    with Sampler(psutil.Process(proc.pid), placement == "inprocess") as sampler:
        while proc.poll() is None:
            metrics = run_dir / "metrics.jsonl"
            if first_row is None and metrics.exists() and metrics.stat().st_size:
                first_row = time.monotonic() - start
            time.sleep(0.5)
    output = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {output[-2000:]}"}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = rows[1:] or rows
    out: dict = {f"{p}_s": median([r[f"time/{p}"] for r in timed]) for p in PHASES}
    out["tokens_per_s"] = median([r["rollout/tokens_per_s"] for r in timed])
    out["first_row_s"] = first_row
    out["whole_run_s"] = time.monotonic() - start
    out["peak_gb"] = {k: v / 2**30 for k, v in sampler.peak.items()}
    out["first_sample_gb"] = {k: v / 2**30 for k, v in sampler.base.items()}
    out["run_dir"] = str(run_dir)
    return out


def report(name: str, result: dict, estimates: dict[str, float]) -> None:
    banner(name)
    if "error" in result:
        print(result["error"])
        return
    print(table(["phase", "s (median)"], [[p, result[f"{p}_s"]] for p in PHASES]))
    print(f"tokens/s {result['tokens_per_s']:.1f}; first row at {result['first_row_s']:.1f} s")
    rows = []
    for role, peak in sorted(result["peak_gb"].items()):
        est = sum(estimates.values()) if role == "all" else estimates.get(role, 0.0)
        rows.append([role, peak, est, peak / est if est else float("nan")])
    print(table(["role", "peak GB", "plan GB", "peak / plan"], rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="hf,vllm")
    parser.add_argument("--placements", default="inprocess,ray")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every setup (repeatable), e.g. policy.lora.r=16",
    )
    args = parser.parse_args(argv)
    from rlhf_ray.models.sources import resolve_model_source

    resolve_model_source("builtin:smollm2-135m-instruct")  # fetched and converted once, here
    results: dict = {"load_avg": os.getloadavg()[0], "overrides": args.set}
    for backend in args.backends.split(","):
        estimates = plan_estimates(backend, args.set)
        for placement in args.placements.split(","):
            result = run_setup(backend, placement, args.rounds, args.set)
            report(f"{backend} backend, {placement}", result, estimates)
            results[f"{backend}_{placement}"] = {**result, "plan_gb": estimates}
    print(json.dumps(results))
    failed = [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
