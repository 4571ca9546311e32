"""Benchmark: each role's peak memory on the real model, beside ``rlhf-ray plan``'s estimate.

What it measures
    ``jobs/arithmetic_cpu.yaml`` (SmolLM2-135M-Instruct; ``--config`` for another), one role
    at a time, each in a fresh process started with ``MALLOC_MMAP_THRESHOLD_=65536`` (glibc then
    returns every freed tensor of 64 KiB or more at once, so resident memory follows the
    tensors alive, as ``torch.cuda.max_memory_allocated`` does on a GPU). After the imports
    (the baseline: interpreter, torch, transformers, vLLM) a thread samples the process's
    resident memory (``VmRSS``: its heap, plus the checkpoint pages transformers keeps mapped
    as the weights) every 2 ms while the role is built by the
    product's own classes and does its part of one round at the config's largest shapes
    (``rollout.batch_size x samples_per_prompt`` rows, ``data.max_prompt_tokens`` prompt
    tokens, ``rollout.max_new_tokens`` response tokens, every response run to full length):

    - ``policy``: ``PolicyLearner`` (the configured engine): the old log-probs of the round's
      rows, then ``train`` on them (every minibatch, every epoch);
    - ``reference``: ``ReferenceScorer.logprobs`` of the round's rows;
    - ``rollout``: the HF worker's ``sample_responses`` of its rows (weights loaded);
    - ``rollout-vllm``: the vLLM worker, started with the weights, sampling its rows.

    The figure is the peak minus the baseline. Beside it: plan's estimate for the role
    (``rlhf_ray.models.memory.role_memory``) and the ratio; ``--tolerance`` (0.15) marks a
    ratio outside ``1 +- tolerance``.

Output
    A table, then ONE JSON line: ``{role: {"peak_gb", "plan_gb", "ratio", "parts_gb"}}``.

How to run (from the repository root; the model is fetched and converted on first use)
    python benchmarks/real_memory.py
    python benchmarks/real_memory.py --roles policy,reference
    python benchmarks/real_memory.py --roles policy --set policy.lora.r=16   # a LoRA policy
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import banner, table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "jobs" / "arithmetic_cpu.yaml"
ROLES = ("policy", "reference", "rollout", "rollout-vllm")
GIB = 2**30


def resident() -> int:
    """The process's resident memory (``VmRSS``: its heap, and the pages of files it maps, such
    as a safetensors checkpoint whose tensors transformers keeps mapped)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class Peak:
    """The largest ``VmRSS`` seen every 2 ms while open."""

    def __enter__(self) -> Peak:
        self.peak, self.stop = resident(), threading.Event()
        self.base = self.peak
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        return self

    def _loop(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, resident())
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, resident())


def config(path: str, role: str, overrides: list[str]):
    from rlhf_ray.config.ppo import load_config
    from rlhf_ray.models.sources import resolve_models

    backend = "vllm" if role == "rollout-vllm" else "hf"
    return resolve_models(load_config(path, [f"rollout.backend={backend}", *overrides]))


def round_rows(cfg, vocab: int):
    """The round's rows at full length: random prompt and response tokens, every response
    unfinished (no EOS), as a ``Rollout``."""
    import torch

    from rlhf_ray.types import Rollout

    r = cfg.rollout
    rows, P, R = r.batch_size * r.samples_per_prompt, cfg.data.max_prompt_tokens, r.max_new_tokens
    g = torch.Generator().manual_seed(0)
    return Rollout(
        prompt_ids=torch.randint(3, vocab, (rows, P), generator=g),
        prompt_mask=torch.ones(rows, P, dtype=torch.long),
        prompt_index=torch.arange(rows) // r.samples_per_prompt,
        response_ids=torch.randint(3, vocab, (rows, R), generator=g),
        response_mask=torch.ones(rows, R, dtype=torch.long),
        has_eos=torch.zeros(rows, dtype=torch.bool),
        sampler_logprobs=-torch.rand(rows, R, generator=g) - 5,
        weight_version=torch.zeros(rows, dtype=torch.long),
        prompts=[""] * rows,
        responses=[""] * rows,
    )


def run_policy(cfg, vocab: int) -> None:
    import torch

    from rlhf_ray.types import PPOBatch
    from rlhf_ray.workers.inprocess import build_learners

    policy, _ = build_learners(cfg)
    rollout = round_rows(cfg, vocab)
    old = policy.old_logprobs(rollout)["old_logprobs"]
    adv = torch.randn_like(old)
    batch = PPOBatch(
        input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
        response_mask=rollout.response_mask, old_logprobs=old, old_values=torch.zeros_like(old),
        advantages=adv, returns=torch.zeros_like(old), ref_logprobs=old - 0.01,
        prompt_len=rollout.prompt_len,
    )  # fmt: skip
    policy.train(batch, 0)


def run_reference(cfg, vocab: int) -> None:
    from rlhf_ray.config.ppo import policy_tokenizer
    from rlhf_ray.workers.scorers import ReferenceScorer

    spec = cfg.reference.model or cfg.policy.model
    scorer = ReferenceScorer(
        spec, policy_tokenizer(cfg), cfg.rollout.temperature, cfg.reference.score_micro_batch_size
    )
    scorer.logprobs(round_rows(cfg, vocab))


def run_rollout(cfg, vocab: int) -> None:
    from rlhf_ray.config.ppo import policy_tokenizer
    from rlhf_ray.engines.generation import sample_responses
    from rlhf_ray.workers.rollout import RolloutGenerator

    gen = RolloutGenerator(cfg.policy.model, policy_tokenizer(cfg), cfg.rollout)
    rows = round_rows(cfg, vocab)
    rows_per_worker = -(-len(rows.prompt_ids) // cfg.rollout.num_workers)
    ids, mask = rows.prompt_ids[:rows_per_worker], rows.prompt_mask[:rows_per_worker]
    # an EOS no token equals: every response runs to max_new_tokens
    out = sample_responses(gen.model, ids, mask, gen.params, vocab, gen.tokenizer.pad_id,
                           list(range(len(ids))), gen.micro_batch_size)  # fmt: skip
    assert out["response_mask"].all(), "a response stopped early"


def run_rollout_vllm(cfg, vocab: int) -> None:
    from rlhf_ray.config.ppo import policy_tokenizer
    from rlhf_ray.workers.vllm_rollout import VLLMRolloutGenerator, generator_kwargs

    gen = VLLMRolloutGenerator(
        cfg.policy.model, policy_tokenizer(cfg), cfg.rollout, **generator_kwargs(cfg)
    )
    rows = round_rows(cfg, vocab)
    rows_per_worker = -(-len(rows.prompt_ids) // cfg.rollout.num_workers)
    ids, mask = rows.prompt_ids[:rows_per_worker], rows.prompt_mask[:rows_per_worker]
    gen.engine.sample(ids, mask, list(range(len(ids))), vocab, gen.tokenizer.pad_id)


RUN = {"policy": run_policy, "reference": run_reference, "rollout": run_rollout,
       "rollout-vllm": run_rollout_vllm}  # fmt: skip


def child(role: str, path: str, overrides: list[str]) -> dict:
    """In the role's own process: the peak above the post-import baseline."""
    import torch  # noqa: F401  (the baseline includes the libraries)
    import transformers  # noqa: F401

    from rlhf_ray.models.memory import Estimate, read_model_config, role_memory

    if role == "rollout-vllm":
        import vllm  # noqa: F401
    cfg = config(path, role, overrides)
    vocab = read_model_config(cfg.policy.model, None)[0]["vocab_size"]
    plan = role_memory(cfg)["rollout" if role.startswith("rollout") else role]
    assert isinstance(plan, Estimate), plan
    with Peak() as peak:
        RUN[role](cfg, vocab)
    return {
        "peak_gb": (peak.peak - peak.base) / GIB,
        "plan_gb": plan.total / GIB,
        "parts_gb": {k: v / GIB for k, v in plan.parts.items()},
    }


def measure(role: str, path: str, overrides: list[str]) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, __file__, "--child", role, "--config", path]
    cmd += [f"--set={o}" for o in overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-1500:]}"}
    out = json.loads(lines[-1])
    out["ratio"] = out["peak_gb"] / out["plan_gb"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--roles", default=",".join(ROLES))
    parser.add_argument("--tolerance", type=float, default=0.15)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every role (e.g. policy.lora.r=16)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.config, args.set)))
        return 0
    from rlhf_ray.models.sources import resolve_model_source

    resolve_model_source("builtin:smollm2-135m-instruct")  # fetched and converted once, here
    results = {role: measure(role, args.config, args.set) for role in args.roles.split(",")}
    banner(f"peak memory per role vs plan ({Path(args.config).name} {' '.join(args.set)})")
    rows = []
    for role, r in results.items():
        if "error" in r:
            print(f"{role}: {r['error']}")
            continue
        ok = abs(r["ratio"] - 1) <= args.tolerance
        rows.append([role, r["peak_gb"], r["plan_gb"], r["ratio"], "yes" if ok else "NO"])
    print(table(["role", "peak GiB", "plan GiB", "peak / plan", "within"], rows))
    print(json.dumps({**results, "load_avg": os.getloadavg()[0]}))
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
