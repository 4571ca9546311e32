"""Benchmark: peak memory of a learner rank under ZeRO-1/2/3, and of a streamed weight sync,
beside `rlhf-ray plan`'s estimate.

What it measures
    A GPT-2 style policy of ~100M fp32 parameters (preset gpt2-tiny, hidden 768, 14 layers,
    12 heads, bytes tokenizer; saved to a temp dir and loaded from that path, as a real
    checkpoint would be) as ``--ranks`` DeepSpeed ranks (default 2; real ``PolicyLearner``
    actors in a ``LearnerGroup`` on a private local Ray, gloo on CPU). For each ZeRO stage,
    every rank samples its own anonymous resident memory (``RssAnon``: private heap, not the
    shared object store) every 2 ms from after its process group is up (the baseline:
    interpreter, torch, DeepSpeed) through model construction (ZeRO-3: under
    ``deepspeed.zero.Init``), engine set-up and one PPO minibatch of 2 rows per rank (forward,
    backward, Adam step). The figure is peak minus baseline, the largest over the ranks. Beside
    it: ``rlhf_ray.models.memory.learner_memory``'s per-rank estimate for the same settings (model
    states, the optimizer step's transients and activations; the fixed per-process overhead is
    left out).

    ``--malloc fixed`` (the default) starts the ranks with ``MALLOC_MMAP_THRESHOLD_=65536``:
    glibc then hands every freed tensor of 64 KiB or more straight back, so ``RssAnon`` follows
    the tensors alive (what ``torch.cuda.max_memory_allocated`` reports on a GPU). ``--malloc
    glibc`` keeps glibc's adaptive default, under which freed blocks stay in the heap for reuse;
    ZeRO-3's many gather/free cycles then leave hundreds of MB of it behind.

    Then the streamed sync, at ZeRO-3, under glibc's default allocator (as a run has it): 2
    ``RolloutGenerator`` workers in a ``RolloutPool`` and the runtime's own bucket streaming
    (``RayWorkers._gather_bucket`` + ``stream_buckets``), with ``sync.bucket_mb`` (default 32).
    Reported: the sync's wall seconds (median of ``--repeats``), rank 0's peak extra
    ``RssAnon`` during a sync, the bucket size and the model size; and a check that a worker's
    greedy continuation equals the learner's.

Output
    A readable table, then ONE JSON line with the keys:
    ``params`` (model parameters), ``ranks``, ``malloc``, ``zero{1,2,3}_peak_mb`` (measured, per
    rank), ``zero{1,2,3}_estimate_mb`` (plan's estimate), ``zero{1,2,3}_estimate_error``
    (estimate / measured - 1), ``zero3_over_zero1`` (peak ratio), ``sync_s`` (median),
    ``sync_peak_extra_mb`` (sending rank), ``buckets``, ``bucket_mb``, ``model_mb``,
    ``sync_parity`` (bool), ``load_avg`` (1-minute load average at the start).

    Each stage also prints its ranks' peaks during set-up (model load, engine) and after one
    training minibatch, both above the same baseline.

How to run (from the repository root; needs ~8 GB of free memory and both cores)
    python benchmarks/memory.py
    python benchmarks/memory.py --layers 4 --bucket-mb 8      # a quicker, smaller model
    python benchmarks/memory.py --stages 1,3 --no-sync         # only the ZeRO-1/3 peaks
    python benchmarks/memory.py --ranks 4 --no-sync            # the peaks over 4 ranks
    python benchmarks/memory.py --malloc glibc --no-sync       # under glibc's default allocator
    python benchmarks/memory.py --dtype bfloat16 --no-sync     # bf16 weights, fp32 master
    python benchmarks/memory.py --stages "" --bucket-mb 128    # only the sync

Measured on this project's 2-core CPU machine (gloo, fp32, ~100M parameters), see the README's
"Memory and scale" for the figures and what they do and do not show.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import types
from collections.abc import Iterator

import _common
import ray
import torch

from rlhf_ray.config.ppo import load_config
from rlhf_ray.data.tokenization import build_tokenizer
from rlhf_ray.distributed.actors import get_all
from rlhf_ray.distributed.learner_group import LearnerGroup, join_groups
from rlhf_ray.distributed.rollout_pool import RolloutPool
from rlhf_ray.distributed.runtime import RayWorkers
from rlhf_ray.models import build_causal_lm
from rlhf_ray.models.memory import ModelShape, learner_memory, read_model_config
from rlhf_ray.types import PPOBatch
from rlhf_ray.workers.learners import PolicyLearner
from rlhf_ray.workers.sync import stream_buckets

MB = 2**20
PROMPT, RESPONSE, ROWS_PER_RANK = 16, 16, 2  # one minibatch of 2 rows per rank


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class MeasuredPolicy(PolicyLearner):
    """A policy rank that also samples its own peak anonymous memory."""

    def mem_start(self) -> int:
        self._peak, self._stop = rss_anon(), threading.Event()
        base = self._peak

        def sample() -> None:
            while not self._stop.is_set():
                self._peak = max(self._peak, rss_anon())
                time.sleep(0.002)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return base

    def mem_stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self._peak, rss_anon())


def ppo_batch(vocab: int, ranks: int) -> PPOBatch:
    g = torch.Generator().manual_seed(0)
    rows = ROWS_PER_RANK * ranks
    ids = torch.randint(3, vocab, (rows, PROMPT + RESPONSE), generator=g)
    return PPOBatch(
        input_ids=ids, attention_mask=torch.ones_like(ids),
        response_mask=torch.ones(rows, RESPONSE, dtype=torch.long),
        old_logprobs=-torch.rand(rows, RESPONSE, generator=g) - 5,
        old_values=torch.zeros(rows, RESPONSE), advantages=torch.randn(rows, RESPONSE, generator=g),
        returns=torch.zeros(rows, RESPONSE), ref_logprobs=-torch.rand(rows, RESPONSE) - 5,
        prompt_len=PROMPT,
    )  # fmt: skip


def preset(args: argparse.Namespace):
    return load_config(None, [
        "policy.model.preset=gpt2-tiny", f"policy.model.hidden_size={args.hidden}",
        f"policy.model.num_layers={args.layers}", f"policy.model.num_heads={args.heads}",
    ]).policy.model  # fmt: skip


def config(args: argparse.Namespace, stage: int, path: str, cpus_per_rank: float = 1.0):
    return load_config(None, [
        f"policy.model.path={path}", f"policy.zero_stage={stage}", f"policy.num_ranks={args.ranks}",
        f"policy.model.dtype={args.dtype}",
        f"policy.num_cpus_per_rank={cpus_per_rank}",
        f"rollout.batch_size={ROWS_PER_RANK * args.ranks}",
        f"ppo.minibatch_size={ROWS_PER_RANK * args.ranks}", "ppo.epochs=1",
        f"data.max_prompt_tokens={PROMPT}", f"rollout.max_new_tokens={RESPONSE}",
        "rollout.num_workers=2", "rollout.num_cpus_per_worker=0.5",
        f"sync.bucket_mb={args.bucket_mb}", "cluster.actor_start_timeout_s=600",
    ])  # fmt: skip


def estimate(cfg) -> tuple[float, int]:
    config_json, _ = read_model_config(cfg.policy.model, cfg.tokenizer)
    assert config_json is not None
    shape = ModelShape.from_config(config_json)
    parts = learner_memory(
        shape, lm_head=True, dtype=cfg.policy.model.dtype, ranks=cfg.policy.num_ranks,
        zero_stage=cfg.policy.zero_stage,
        engine="deepspeed", offload_optimizer=False, offload_params=False,
        micro_batch=ROWS_PER_RANK, seq_len=PROMPT + RESPONSE, response_len=RESPONSE,
        checkpointing=False, on_gpu=False,
    )  # fmt: skip
    # the per-process overhead is left out: the baseline is taken inside the running actor
    return sum(v for k, v in parts.items() if k != "overhead"), shape.num_params()


def start_group(cfg) -> LearnerGroup:
    group = LearnerGroup(
        "policy", MeasuredPolicy, cfg.policy, 600, 600, policy_cfg=cfg.policy, ppo_cfg=cfg.ppo,
        tokenizer_cfg=cfg.tokenizer, temperature=1.0, seed=0,
    )  # fmt: skip
    join_groups([group])
    return group


def measure_training(cfg, vocab: int) -> float:
    """Peak RssAnon above the baseline, the largest over the ranks, in bytes."""
    group = start_group(cfg)
    try:
        base = get_all(group.call("mem_start"))
        get_all(group.call("setup"))
        setup = get_all(group.call("mem_stop"))
        get_all(group.call("mem_start"))
        get_all(group.call("train", ppo_batch(vocab, cfg.policy.num_ranks), 0))
        peak = get_all(group.call("mem_stop"))
        print(
            "  setup peak",
            [round((s - b) / MB) for s, b in zip(setup, base, strict=True)],
            "train peak",
            [round((p - b) / MB) for p, b in zip(peak, base, strict=True)],
        )
        return max(max(p, s) - b for p, s, b in zip(peak, setup, base, strict=True))
    finally:
        group.kill()


def measure_sync(cfg, repeats: int) -> dict:
    group = start_group(cfg)
    pool = RolloutPool(cfg)
    try:
        get_all(group.call("setup"))
        pool.grow(2)
        shim = types.SimpleNamespace(policy=group, cfg=cfg)
        count = ray.get(group.actors[0].num_weight_buckets.remote(cfg.sync.bucket_mb))
        times, peaks = [], []
        for version in range(repeats + 1):
            base = get_all(group.call("mem_start"))[0]
            start = time.perf_counter()
            pool.begin(version, count)
            stream_buckets(count, lambda k: RayWorkers._gather_bucket(shim, k), pool.load_bucket)
            elapsed = time.perf_counter() - start
            peak = get_all(group.call("mem_stop"))[0]
            if version:  # the first is a warm-up
                times.append(elapsed)
                peaks.append(peak - base)
        probe = torch.tensor([[5, 6, 7, 8]]), torch.ones(1, 4, dtype=torch.long)
        learner = get_all(group.call("greedy", *probe, 6))[0]
        sampled = ray.get([w.greedy.remote(*probe, 6) for w in pool.workers])
        parity = all(torch.equal(s, learner) for s in sampled)
        return {"sync_s": statistics.median(times), "sync_peak_extra_mb": max(peaks) / MB,
                "buckets": count, "sync_parity": parity}  # fmt: skip
    finally:
        pool.kill()
        group.kill()


@contextlib.contextmanager
def malloc_env(kind: str) -> Iterator[None]:
    """``fixed``: Ray's processes started inside return every freed block of 64 KiB or more to
    the system at once (glibc reads ``MALLOC_MMAP_THRESHOLD_`` when a process starts), so their
    RssAnon follows the tensors alive, as ``torch.cuda.max_memory_allocated`` does on a GPU.
    ``glibc``: its default, which raises the threshold as big blocks are freed and then keeps
    freed memory for reuse: RssAnon shows the allocator's high-water mark."""
    if kind == "glibc":
        yield
        return
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    try:
        yield
    finally:
        del os.environ["MALLOC_MMAP_THRESHOLD_"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=14)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--bucket-mb", type=float, default=32.0)
    p.add_argument("--repeats", type=int, default=3, help="timed syncs (median shown)")
    p.add_argument("--stages", default="1,2,3", help="ZeRO stages to measure (1 and 3: ratio)")
    p.add_argument("--no-sync", action="store_true", help="skip the sync measurement")
    p.add_argument("--ranks", type=int, default=2, help="learner ranks (the issue's figure: 2)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="the policy's weights (bfloat16: DeepSpeed's mixed precision)")  # fmt: skip
    p.add_argument(
        "--malloc", choices=("fixed", "glibc"), default="fixed",
        help="fixed: the actors' glibc returns every freed block of 64 KiB or more at once, so "
        "RssAnon follows the live tensors; glibc: its default adaptive threshold",
    )  # fmt: skip
    args = p.parse_args(argv)
    load = os.getloadavg()[0]
    _common.banner("memory: ZeRO-1/2/3 peak per rank and a streamed weight sync")
    result: dict = {"load_avg": round(load, 2), "bucket_mb": args.bucket_mb,
                    "ranks": args.ranks, "malloc": args.malloc, "dtype": args.dtype}  # fmt: skip
    rows = []
    model_dir = tempfile.mkdtemp(prefix="mem-bench-")
    spec = preset(args)
    build_causal_lm(spec, build_tokenizer(load_config().tokenizer)).save_pretrained(model_dir)
    stages = [int(s) for s in args.stages.split(",") if s]
    if stages:
        with malloc_env(args.malloc), _common.local_ray(max(2, args.ranks)):
            for stage in stages:
                cfg = config(args, stage, model_dir)
                est, params = estimate(cfg)
                vocab = build_tokenizer(cfg.tokenizer).vocab_size
                peak = measure_training(cfg, vocab)
                result["params"] = params
                result[f"zero{stage}_peak_mb"] = round(peak / MB, 1)
                result[f"zero{stage}_estimate_mb"] = round(est / MB, 1)
                result[f"zero{stage}_estimate_error"] = round(est / peak - 1, 3)
                error = f"{100 * (est / peak - 1):+.0f}%"
                rows.append((f"ZeRO-{stage}", peak / MB, est / MB, error))
                print(f"ZeRO-{stage}: peak {peak / MB:,.0f} MB, estimate {est / MB:,.0f} MB",
                      flush=True)  # fmt: skip
    if "zero1_peak_mb" in result and "zero3_peak_mb" in result:
        result["zero3_over_zero1"] = round(result["zero3_peak_mb"] / result["zero1_peak_mb"], 3)
    result["model_mb"] = round(estimate(config(args, 3, model_dir))[1] * 4 / MB, 1)
    if not args.no_sync:  # the runtime's own allocator; ranks and 2 workers share the CPUs
        with _common.local_ray(max(2, args.ranks)):
            result.update(measure_sync(config(args, 3, model_dir, 0.5), args.repeats))
    shutil.rmtree(model_dir, ignore_errors=True)
    print()
    if rows:
        print(_common.table(["stage (2 ranks)", "peak MB/rank", "plan MB/rank", "error"], rows))
    if "zero3_over_zero1" in result:
        print(f"ZeRO-3 / ZeRO-1 peak: {result['zero3_over_zero1']:.2f}")
    if args.no_sync:
        print(json.dumps(result))
        return 0
    print(
        f"sync ({result['buckets']} buckets of <= {args.bucket_mb:g} MB, model "
        f"{result['model_mb']:,.0f} MB, 2 workers): {result['sync_s']:.2f} s, sending rank's "
        f"peak extra {result['sync_peak_extra_mb']:,.0f} MB, parity {result['sync_parity']}"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
