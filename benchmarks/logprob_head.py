"""Benchmark: what the policy loss's LM head costs per micro-batch, with and without the
entropy stat and the chunk's recomputation, on SmolLM2's head (576 -> 49,152, float32).

What it measures
    One micro-batch of the real-model round's responses (8 rows x 24 tokens = 192 hidden
    states) through ``rlhf_ray.models.logprobs.response_logprobs``'s head alone (a stand-in
    model whose body returns fixed hidden states, so only the head and the log-softmax work
    count): forward, a loss on the log-probs, backward. Variants, interleaved ``--repeats``
    times in one process:

    entropy+recompute  the entropy stat beside the log-probs, each chunk recomputed in the
                       backward (what ``PolicyObjective`` asked for before issue 34)
    entropy            the same, the chunk's activations kept (one chunk: no memory saved)
    plain              log-probs alone, activations kept

Output
    Milliseconds per micro-batch (median), with the load average; then ONE JSON line.

How to run (from the repository root)
    python benchmarks/logprob_head.py --repeats 20
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import banner, median, table  # noqa: E402

ROWS, PROMPT_LEN, RESPONSE_LEN = 8, 45, 24


class HeadOnly(nn.Module):
    """A causal LM whose body is fixed hidden states: only the head does work."""

    def __init__(self, head: nn.Linear, hidden: torch.Tensor):
        super().__init__()
        self.head, self.hidden = head, hidden
        self.config = SimpleNamespace()

    def get_output_embeddings(self) -> nn.Linear:
        return self.head

    def base_model(self, **_: object) -> SimpleNamespace:
        return SimpleNamespace(last_hidden_state=self.hidden)


def variants(model: HeadOnly, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    from rlhf_ray.models.logprobs import response_logprobs

    def run(with_entropy: bool, recompute: bool) -> None:
        logp, _ = response_logprobs(
            model,
            ids,
            mask,
            PROMPT_LEN,
            temperature=0.7,
            with_entropy=with_entropy,
            entropy_grad=False,
            recompute=recompute,
        )
        logp.sum().backward()

    return {
        "entropy+recompute": lambda: run(True, True),
        "entropy": lambda: run(True, False),
        "plain": lambda: run(False, False),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM

    from rlhf_ray.models.sources import resolve_model_source

    banner("the policy loss's LM head per micro-batch")
    lm = AutoModelForCausalLM.from_pretrained(
        resolve_model_source("builtin:smollm2-135m-instruct"), dtype=torch.float32
    )
    head = lm.get_output_embeddings()
    gen = torch.Generator().manual_seed(0)
    T = PROMPT_LEN + RESPONSE_LEN
    hidden = torch.randn(ROWS, T, head.in_features, generator=gen, requires_grad=True)
    ids = torch.randint(0, head.out_features, (ROWS, T), generator=gen)
    runs = variants(HeadOnly(head, hidden), ids, torch.ones_like(ids))
    times: dict[str, list[float]] = {name: [] for name in runs}
    for rep in range(args.repeats + 1):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            if rep:  # the first pass warms up
                times[name].append(1000 * (time.perf_counter() - start))
    print(table(["variant", "ms / micro-batch"], [[n, median(t)] for n, t in times.items()]))
    print(f"load average {os.getloadavg()[0]:.2f}")
    print(json.dumps({"ms": times, "load_avg": os.getloadavg()[0]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
