"""Benchmark: moving a policy's full weights to rollout workers through the Ray object store.

What it measures
    A GPT-2 style model of ~85M parameters (``build_causal_lm`` on
    ``ModelSpec(preset="gpt2-tiny", hidden_size=768, num_layers=12, num_heads=12)`` with the
    built-in bytes tokenizer) is built in the driver and in a small receiver actor defined here.
    One "sync" is, end to end, from the driver's ``model.state_dict()`` until the actor has the
    weights loaded into its own model and has answered:

    (a) torch  fp32: ``ray.put(state_dict)``          -> actor ``ray.get`` -> ``load_state_dict``
    (b) numpy  fp32: ``state_dict_to_numpy`` -> ``ray.put`` -> actor ``ray.get`` ->
                     ``state_dict_from_numpy`` -> ``load_state_dict``   (what rlhf_ray does)
    (c) numpy  bf16: (b) with bfloat16 weights (they travel as an int16 view)
    (a') torch bf16: (a) with bfloat16 weights, for symmetry

    Each sync is broken down into driver-side conversion, ``ray.put``, the actor's ``ray.get``
    (deserialisation), the actor's conversion + ``load_state_dict``, and the rest (task
    submission, scheduling, the reply). Every sync perturbs one weight first and checks that the
    actor's copy matches, so nothing is cached. Figures are the median of ``--repeats`` syncs
    after one untimed warm-up; MB is what was put in the object store (tied weights counted once
    for torch, twice once converted to numpy).

    Then the real path: ``ray.remote(RolloutGenerator)`` workers (``--rollout-workers``, default
    2, like the default pool) built from the same ``model_spec`` with ``TokenizerConfig()`` and
    ``RolloutConfig()``, and ``RayWorkers.sync``'s pattern: the weights in buckets of about
    ``--bucket-mb`` MB (``sync.bucket_mb``), each ``state_dict_to_numpy`` -> ``ray.put`` once ->
    ``load_bucket.remote(ref, version, k, count)`` on every worker, the next bucket converted
    and put while the workers load this one (``stream_buckets``). In a real run the put is the
    policy rank 0's ``weight_bucket`` return value instead.

    ``--transports``: instead, the two ``sync.transport`` values side by side on the same model
    (``benchmarks/_transports.py``), on that GPT-2 or on a real model (``--model``: a
    directory, ``.gguf`` file or ``builtin:`` name, with its own tokenizer, in fp32): a sender
    actor standing in for policy rank 0 and
    ``RolloutGenerator`` workers (``--workers``, default 1,2,4), each sync streamed as
    ``RayWorkers.sync`` does: seconds per sync, s/GB, and the peak host memory above the
    baseline of rank 0 and of a worker (the largest) during the timed syncs.

How to run (from the repository root)
    python benchmarks/weight_sync.py                  # ~85M params, 5 repeats (under a minute)
    python benchmarks/weight_sync.py --transports --repeats 3   # object_store vs collective
    python benchmarks/weight_sync.py --transports --model builtin:smollm2-135m-instruct
    python benchmarks/weight_sync.py --repeats 5 --rollout-workers 1
    python benchmarks/weight_sync.py --hidden 256 --layers 6 --heads 8   # a smaller model

Timings on a loaded 2-core machine are noisy; nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import _common
import _transports
import ray
import torch

from rlhf_ray.config.ppo import ModelSpec, RolloutConfig, SyncConfig, TokenizerConfig
from rlhf_ray.data.tokenization import build_tokenizer
from rlhf_ray.models import build_causal_lm, state_dict_from_numpy, state_dict_to_numpy
from rlhf_ray.models.sources import resolve_model_source
from rlhf_ray.models.weights import full_nbytes, plan_buckets, weight_tensors
from rlhf_ray.workers.rollout import RolloutGenerator
from rlhf_ray.workers.sync import stream_buckets

PROBE = "transformer.h.0.attn.c_attn.weight"  # perturbed before every sync, checked after
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--repeats", type=int, default=5, help="timed syncs per path (median shown)")
    p.add_argument("--rollout-workers", type=int, default=2, help="RolloutGenerator actors")
    p.add_argument("--bucket-mb", type=float, default=SyncConfig().bucket_mb, help="sync bucket")
    p.add_argument("--skip-torch", action="store_true", help="skip the (slow) torch-tensor paths")
    p.add_argument("--transports", action="store_true", help="compare sync.transport values")
    p.add_argument("--workers", default="1,2,4", help="worker counts for --transports")
    p.add_argument(
        "--model",
        default=None,
        help="with --transports: a model path (directory, .gguf, builtin:) instead of the GPT-2",
    )
    return p.parse_args(argv)


def checksum(t: torch.Tensor) -> float:
    return float(t.detach().double().sum())


@ray.remote(num_cpus=1)
class Receiver:
    """Holds the same model as the driver; loads weights sent as torch tensors or numpy."""

    def __init__(self, spec: ModelSpec):
        torch.set_num_threads(1)
        self.model = build_causal_lm(spec, build_tokenizer(TokenizerConfig()))

    def to(self, dtype_name: str) -> str:
        self.model.to(DTYPES[dtype_name])
        return str(next(self.model.parameters()).dtype)

    def load(self, refs: list, kind: str) -> dict[str, float]:
        start = time.perf_counter()
        payload = ray.get(refs[0])  # the object-store read / deserialisation
        got = time.perf_counter()
        state = state_dict_from_numpy(payload) if kind == "numpy" else payload
        self.model.load_state_dict(state)
        done = time.perf_counter()
        probe = self.model.get_parameter(PROBE)
        return {"get": got - start, "load": done - got, "check": checksum(probe)}


def payload_mb(kind: str, payload) -> float:
    if kind == "numpy":
        return sum(a.nbytes for a, _ in payload.values()) / 1e6
    seen, total = set(), 0
    for t in payload.values():
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total / 1e6


def one_sync(model, actor, kind: str) -> dict[str, float]:
    with torch.no_grad():
        model.get_parameter(PROBE).add_(1e-3)  # new weights every sync
    expected = checksum(model.get_parameter(PROBE))
    start = time.perf_counter()
    state = model.state_dict()
    payload = state_dict_to_numpy(state) if kind == "numpy" else state
    converted = time.perf_counter()
    ref = ray.put(payload)
    put = time.perf_counter()
    out = ray.get(actor.load.remote([ref], kind))
    total = time.perf_counter() - start
    del ref
    if abs(out["check"] - expected) > 1e-3 * max(1.0, abs(expected)):
        raise RuntimeError(f"actor weights differ after sync: {out['check']} != {expected}")
    return {
        "convert": converted - start,
        "put": put - converted,
        "get": out["get"],
        "load": out["load"],
        "other": total - (put - start) - out["get"] - out["load"],
        "total": total,
        "mb": payload_mb(kind, payload),
    }


def measure(model, actor, kind: str, repeats: int) -> dict[str, float]:
    one_sync(model, actor, kind)  # warm-up
    runs = [one_sync(model, actor, kind) for _ in range(repeats)]
    med = {k: _common.median([r[k] for r in runs]) for k in runs[0]}
    med["min_total"] = min(r["total"] for r in runs)
    return med


def bucketed_sync(gens, tensors: dict, groups: list[list[int]], version: int) -> tuple:
    """One sync of ``version`` in buckets: (seconds, of which convert+put, bytes, versions)."""
    names, count = list(tensors), len(groups)
    start = time.perf_counter()
    put_s, nbytes, versions = 0.0, 0, []

    def gather(k: int):
        nonlocal put_s, nbytes
        began = time.perf_counter()
        bucket = state_dict_to_numpy({names[i]: tensors[names[i]] for i in groups[k]})
        nbytes += sum(a.nbytes for a, _ in bucket.values())
        ref = ray.put(bucket)
        put_s += time.perf_counter() - began
        return lambda: ref

    def load(ref, k: int) -> None:
        versions[:] = ray.get([g.load_bucket.remote(ref, version, k, count) for g in gens])

    stream_buckets(count, gather, load)
    return time.perf_counter() - start, put_s, nbytes, versions


def real_path(spec: ModelSpec, model, workers: int, repeats: int, bucket_mb: float) -> dict:
    """RolloutGenerator actors and RayWorkers.sync's pattern: the weights in buckets of about
    ``bucket_mb`` MB, each put once and loaded by every worker (``load_bucket``) while the next
    one is converted and put (``stream_buckets``)."""
    cpus = max(0.1, min(1.0, 1.9 / workers))
    remote = ray.remote(RolloutGenerator).options(num_cpus=cpus)
    start = time.perf_counter()
    gens = [
        remote.remote(spec, TokenizerConfig(), RolloutConfig(), worker_id=i, num_threads=1)
        for i in range(workers)
    ]
    ray.get([g.ping.remote() for g in gens])
    build_s = time.perf_counter() - start
    tensors = weight_tensors(model)
    groups = plan_buckets([full_nbytes(t) for t in tensors.values()], int(bucket_mb * 2**20))
    try:
        totals, puts, mbs = [], [], []
        for version in range(repeats + 1):
            with torch.no_grad():
                model.get_parameter(PROBE).add_(1e-3)
            total, put_s, nbytes, versions = bucketed_sync(gens, tensors, groups, version)
            if versions != [version] * workers:
                raise RuntimeError(f"load_bucket returned {versions}, expected {version}")
            if version:  # version 0 is the warm-up
                totals.append(total)
                puts.append(put_s)
                mbs.append(nbytes / 1e6)
        return {
            "build": build_s,
            "convert+put": _common.median(puts),
            "total": _common.median(totals),
            "min_total": min(totals),
            "mb": mbs[0],
        }
    finally:
        for g in gens:
            ray.kill(g)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # the driver shares 2 cores with the actors
    _common.banner("weight_sync: full policy weights through the Ray object store")
    spec = ModelSpec(
        preset="gpt2-tiny",
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
    )
    tok = build_tokenizer(TokenizerConfig())
    start = time.perf_counter()
    model = build_causal_lm(spec, tok)
    n_params = sum(p.numel() for p in model.parameters())
    n_state = sum(t.numel() for t in model.state_dict().values())
    print(
        f"model: gpt2 h{args.hidden} l{args.layers} heads{args.heads}, vocab {tok.vocab_size}: "
        f"{n_params:,} parameters ({n_params / 1e6:.1f}M; {n_state:,} values in the state dict "
        f"with tied embeddings counted twice); built in {time.perf_counter() - start:.1f}s",
        flush=True,
    )
    if args.transports:
        tok_cfg = TokenizerConfig()
        if args.model:
            spec = ModelSpec(path=resolve_model_source(args.model))
            tok_cfg = TokenizerConfig(kind="hf", name_or_path=spec.path)
            print(f"--model {args.model}: {spec.path}", flush=True)
        with _common.local_ray(2):
            counts = [int(n) for n in args.workers.split(",")]
            print(_transports.compare(spec, tok_cfg, counts, args.repeats, args.bucket_mb))
        print(
            "  s/GB: seconds per sync / GB of weights; peak +MB: resident set above the "
            "process's own before the timed syncs (shared object-store pages included); "
            "shared slot MB: the one bucket-sized shared-memory copy rank 0 keeps per formation "
            "for the workers on its host (mapped by each of them, counted once per host)."
        )
        return 0
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)

    rows, real_rows = [], []
    with _common.local_ray(2) as ray_init:
        print(f"local Ray up in {ray_init:.1f}s; {args.repeats} timed syncs per path", flush=True)
        actor = Receiver.remote(spec)
        try:
            paths = [("(b) numpy fp32 [ours]", "numpy", "fp32")]
            paths.append(("(c) numpy bf16 [ours]", "numpy", "bf16"))
            if not args.skip_torch:
                paths.insert(0, ("(a) torch fp32", "torch", "fp32"))
                paths.append(("(a') torch bf16", "torch", "bf16"))
            for label, kind, dtype in sorted(paths, key=lambda p: p[2] != "fp32"):  # fp32 first
                ray.get(actor.to.remote(dtype))
                src = model if dtype == "fp32" else model_bf16
                print(f"  {label} ...", flush=True)
                rows.append((label, measure(src, actor, kind, args.repeats)))
        finally:
            ray.kill(actor)
        for dtype in ("fp32", "bf16"):
            real_spec = spec.model_copy(
                update={"dtype": "bfloat16" if dtype == "bf16" else "float32"}
            )
            src = model if dtype == "fp32" else model_bf16
            label = f"RolloutGenerator.load_bucket {dtype} x{args.rollout_workers}"
            print(f"  {label} ...", flush=True)
            real_rows.append(
                (
                    label,
                    real_path(real_spec, src, args.rollout_workers, args.repeats, args.bucket_mb),
                )
            )

    order = {"(a) torch fp32": 0, "(b) numpy fp32 [ours]": 1, "(c) numpy bf16 [ours]": 2}
    rows.sort(key=lambda r: order.get(r[0], 3))
    print()
    print(
        _common.table(
            [
                "one driver -> actor sync",
                "MB",
                "convert s",
                "put s",
                "get s",
                "load s",
                "other s",
                "total s",
                "min s",
                "MB/s",
            ],
            [
                (
                    label,
                    m["mb"],
                    m["convert"],
                    m["put"],
                    m["get"],
                    m["load"],
                    m["other"],
                    m["total"],
                    m["min_total"],
                    m["mb"] / m["total"],
                )
                for label, m in rows
            ],
        )
    )
    print(
        "  convert: state_dict_to_numpy in the driver; get: ray.get in the actor; load: "
        "state_dict_from_numpy (numpy) + load_state_dict; other: submit, schedule, reply."
    )
    print()
    print(
        _common.table(
            [
                "real path (one put, all workers)",
                "MB",
                "actor build s",
                "convert+put s",
                "total s",
                "min s",
                "MB/s",
            ],
            [
                (
                    label,
                    m["mb"],
                    m["build"],
                    m["convert+put"],
                    m["total"],
                    m["min_total"],
                    m["mb"] / m["total"],
                )
                for label, m in real_rows
            ],
        )
    )
    print("  MB/s: MB put once / total seconds until every worker has loaded them.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
