"""Measurement: the sampler/learner log-prob gap with top-k / top-p sampling.

What it measures
    ``rollout/logprob_gap`` (mean |sampler log-prob - learner log-prob| over valid response
    tokens) when the rollout samples with ``--top-k`` / ``--top-p`` (defaults 20 / 0.9,
    temperature 1), two ways:

    - ``gap_filtered``: the learner applies the same temperature, top-k and top-p processing as
      the sampler (what a run does now);
    - ``gap_unfiltered``: the learner's log-probs are temperature-only, as before that change
      (the sampler's processed log-probs against the learner's unfiltered ones).

    Also ``outside_filter_tokens``: sampled tokens outside the learner's filtered set. The
    policy is the embedded default (gpt2-tiny, hidden 64, random init, bytes vocabulary) and,
    with ``--hidden 256 --layers 6``, a larger one; prompts are the bundled ones, batch 32,
    ``--new-tokens`` 16. Prints one JSON line.

How to run (from the repository root)
    python benchmarks/logprob_gap.py
    python benchmarks/logprob_gap.py --top-k 50 --top-p 0.95 --hidden 256 --layers 6
"""

from __future__ import annotations

import argparse
import json

import torch

from rlhf_ray.config.ppo import ModelSpec, TokenizerConfig
from rlhf_ray.data import load_prompts
from rlhf_ray.data.tokenization import build_tokenizer, encode_prompts
from rlhf_ray.engines.generation import SamplingParams, sample_responses
from rlhf_ray.models import build_causal_lm, response_logprobs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=16)
    args = p.parse_args()
    tok = build_tokenizer(TokenizerConfig())
    spec = ModelSpec(hidden_size=args.hidden, num_layers=args.layers)
    model = build_causal_lm(spec, tok).eval()
    ids, mask, _ = encode_prompts(tok, load_prompts("builtin")[: args.batch], 48)
    params = SamplingParams(args.new_tokens, 1.0, args.top_k, args.top_p)
    out = sample_responses(model, ids, mask, params, tok.eos_id, tok.pad_id,
                           list(range(len(ids))))  # fmt: skip
    input_ids = torch.cat([ids, out["response_ids"]], 1)
    attention_mask = torch.cat([mask, out["response_mask"]], 1)
    valid = out["response_mask"].bool()
    gaps, outside = {}, []
    with torch.no_grad():
        for name, top in (("filtered", (args.top_k, args.top_p)), ("unfiltered", (0, 1.0))):
            learner, _ = response_logprobs(model, input_ids, attention_mask, ids.shape[1], 1.0,
                                           top_k=top[0], top_p=top[1], outside=outside)  # fmt: skip
            gaps[f"gap_{name}"] = float((out["sampler_logprobs"] - learner)[valid].abs().mean())
    print(json.dumps({"top_k": args.top_k, "top_p": args.top_p, "hidden": args.hidden,
                      "layers": args.layers, **gaps,
                      "outside_filter_tokens": int((outside[0] & valid).sum()),
                      "valid_tokens": int(valid.sum())}))  # fmt: skip


if __name__ == "__main__":
    main()
