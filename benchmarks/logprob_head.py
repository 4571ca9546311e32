"""Benchmark: what the policy loss's LM head costs per micro-batch, with and without the
entropy stat and the chunk's recomputation, on SmolLM2's head (576 -> 49,152, float32).

What it measures
    One micro-batch of the real-model round's responses (8 rows x 24 tokens = 192 hidden
    states) through ``rlhf_ray.models.logprobs.response_logprobs``'s head alone (a stand-in
    model whose body returns fixed hidden states, so only the head and the log-softmax work
    count): forward, a loss on the log-probs, backward. Variants, interleaved ``--repeats``
    times in one process:

    before      ``PolicyObjective``'s call at entropy_coef 0 (log-probs and the logged
                entropy) on ``models/logprobs.py`` as of git revision ``--before`` (default:
                the commit before issue 34's change), loaded from git beside the current one
    recompute   the same call now, the chunk recomputed in the backward anyway
    now         the same call now (one chunk: activations kept)
    no entropy  log-probs alone now: the floor

Output
    Milliseconds per micro-batch (median), with the load average; then ONE JSON line.

How to run (from the repository root)
    python benchmarks/logprob_head.py --repeats 20 [--before REV]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import banner, median, table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
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


def module_at(revision: str, path: str) -> ModuleType:
    """``path`` of the repository as of git ``revision``, imported under a private name."""
    source = subprocess.run(
        ["git", "show", f"{revision}:{path}"], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout
    module = ModuleType(f"before_{Path(path).stem}")
    exec(compile(source, f"{revision}:{path}", "exec"), module.__dict__)
    return module


def variants(model: HeadOnly, ids: torch.Tensor, mask: torch.Tensor, before: str) -> dict:
    from rlhf_ray.models.logprobs import response_logprobs

    old = module_at(before, "rlhf_ray/models/logprobs.py").response_logprobs

    def run(fn, with_entropy: bool = True, **kw: bool) -> None:
        logp, _ = fn(model, ids, mask, PROMPT_LEN, 0.7, with_entropy, entropy_grad=False, **kw)
        logp.sum().backward()

    return {
        "before": lambda: run(old),
        "recompute": lambda: run(response_logprobs, recompute=True),
        "now": lambda: run(response_logprobs),
        "no entropy": lambda: run(response_logprobs, False),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--before", default="572f580", help="git revision of the old head")
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
    runs = variants(HeadOnly(head, hidden), ids, torch.ones_like(ids), args.before)
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
