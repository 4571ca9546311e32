"""Benchmark: the update phase of a real-model round alone, per engine, against the hand loop's,
interleaved in one process (so a loaded machine slows every variant alike).

What it measures
    One round's batch of ``jobs/arithmetic_cpu.yaml`` (32 rows: SmolLM2's 45-token prompts + 24
    response tokens, micro-batches of 8, 2 minibatches of 16, k3 KL in the loss), made up
    once: random responses, random advantages, old and reference log-probs from the model. Each
    variant trains on it ``--repeats`` times in turn (hand, torch, deepspeed, hand, ...):

    hand       ``benchmarks/hand_loop.py``'s update (plain AdamW; the same model copy each time)
    torch      ``PolicyLearner.train`` on the torch engine
    deepspeed  ``PolicyLearner.train`` on DeepSpeed (ZeRO-2, one rank: the old default)

    With ``--profile DIR`` one more call of each is run under cProfile, and the functions by
    own time and by cumulative time are written to ``DIR/update_<variant>.txt``.

Output
    Seconds per update (median over repeats) and the ratio to the hand loop, with the load
    average; then ONE JSON line.

How to run (from the repository root)
    python benchmarks/update_ab.py --repeats 3
    python benchmarks/update_ab.py --repeats 1 --profile benchmarks/profiles
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import banner, median, table  # noqa: E402
from hand_loop import HandLoop  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ROWS, PROMPT_LEN, RESPONSE_LEN = 32, 45, 24


def learner(engine: str):
    from rlhf_ray.config.ppo import load_config
    from rlhf_ray.models.sources import resolve_models
    from rlhf_ray.workers.inprocess import build_learner

    overrides = [f"policy.engine={engine}", "ppo.micro_batch_size=8"]
    cfg = resolve_models(load_config(str(REPO / "jobs" / "arithmetic_cpu.yaml"), overrides))
    policy = build_learner(cfg, "policy")
    if engine == "deepspeed":
        from rlhf_ray.engines.training import free_port

        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        policy.init_process_group("127.0.0.1", free_port(), 600)
    policy.setup()
    return policy


def make_batch(loop: HandLoop):
    from hand_loop import response_logprobs

    from rlhf_ray.types import PPOBatch

    gen = torch.Generator().manual_seed(0)
    vocab = loop.policy.config.vocab_size
    prompt = torch.randint(0, vocab, (ROWS, PROMPT_LEN), generator=gen)
    response = torch.randint(0, vocab, (ROWS, RESPONSE_LEN), generator=gen)
    ids = torch.cat([prompt, response], 1)
    mask = torch.ones_like(ids)
    response_mask = torch.ones(ROWS, RESPONSE_LEN)
    with torch.no_grad():
        old = response_logprobs(loop.policy, ids, mask, PROMPT_LEN)
    advantages = torch.randn(ROWS, 1, generator=gen).expand(ROWS, RESPONSE_LEN).contiguous()
    return PPOBatch(
        input_ids=ids,
        attention_mask=mask,
        response_mask=response_mask,
        old_logprobs=old,
        old_values=torch.zeros(ROWS, RESPONSE_LEN),
        advantages=advantages,
        returns=torch.zeros(ROWS, RESPONSE_LEN),
        ref_logprobs=old - 0.01,
        prompt_len=PROMPT_LEN,
    )


def hand_update(loop: HandLoop, batch) -> None:
    b = {
        "ids": batch.input_ids,
        "mask": batch.attention_mask,
        "response_mask": batch.response_mask,
        "prompt_len": batch.prompt_len,
        "old": batch.old_logprobs,
        "ref": batch.ref_logprobs,
        "adv": batch.advantages,
    }
    loop.update(b, 0)


def profile(fn, path: Path) -> None:
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    out.write(f"load average {os.getloadavg()[0]:.2f}\n== by own time\n")
    stats.sort_stats("tottime").print_stats(30)
    out.write("== by cumulative time\n")
    stats.sort_stats("cumulative").print_stats(45)
    path.write_text(out.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default="hand,torch,deepspeed")
    parser.add_argument("--profile", default=None, help="a directory for cProfile tables")
    args = parser.parse_args(argv)
    from rlhf_ray.models.sources import resolve_model_source

    banner("the update phase of a real-model round, per engine, interleaved")
    loop = HandLoop(resolve_model_source("builtin:smollm2-135m-instruct"))
    batch = make_batch(loop)
    variants = args.variants.split(",")
    learners = {v: learner(v) for v in variants if v != "hand"}
    runs = {v: (lambda v=v: hand_update(loop, batch)) for v in variants if v == "hand"}
    runs |= {v: (lambda v=v: learners[v].train(batch, 0)) for v in learners}
    runs[variants[0]]()  # warm-up (lazy kernels, the allocator)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:
            start = time.perf_counter()
            runs[v]()
            times[v].append(time.perf_counter() - start)
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        for v in variants:
            profile(runs[v], Path(args.profile) / f"update_{v}.txt")
    base = median(times.get("hand", [])) if "hand" in times else float("nan")
    rows = [[v, median(ts), median(ts) / base] for v, ts in times.items()]
    print(table(["variant", "update s", "/ hand"], rows))
    print(f"load average {os.getloadavg()[0]:.2f}")
    print(json.dumps({"times": times, "load_avg": os.getloadavg()[0]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
