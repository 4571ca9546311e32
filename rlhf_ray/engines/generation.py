"""Sampling responses with the KV-cached Hugging Face ``generate``.

Prompts arrive left-padded; ``generate`` derives positions from the mask itself, so no position
ids are passed (DESIGN.md §4). Every response is sampled up to ``max_new_tokens``, then truncated
after its first EOS; the returned tensors always have exactly ``max_new_tokens`` columns so that
shards from different workers concatenate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig

from rlhf_ray.algo import truncate_after_eos
from rlhf_ray.models import logprobs_from_logits


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


@torch.no_grad()
def sample_responses(
    model: Any,  # a transformers model (it has .generate)
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    params: SamplingParams,
    eos_id: int,
    pad_id: int,
    seed: int,
    greedy: bool = False,
) -> dict[str, torch.Tensor]:
    """Sample one response per prompt row.

    Returns ``response_ids (B, R)`` (pad after the first EOS), ``response_mask (B, R)``,
    ``has_eos (B,)`` and the sampler's own ``sampler_logprobs (B, R)`` (temperature-scaled,
    unfiltered by top-k/top-p) for logging the sampler/learner gap.
    """
    config = GenerationConfig(
        do_sample=not greedy,
        max_new_tokens=params.max_new_tokens,
        min_new_tokens=0,
        temperature=params.temperature if not greedy else None,
        top_k=params.top_k if not greedy else None,
        top_p=params.top_p if not greedy else None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        output_logits=True,
        return_dict_in_generate=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config
        )
    new = out.sequences[:, prompt_ids.shape[1] :]
    logits = torch.stack(out.logits, dim=1)
    gap = params.max_new_tokens - new.shape[1]
    if gap > 0:  # every row finished early: pad to the fixed width
        new = torch.nn.functional.pad(new, (0, gap), value=pad_id)
        logits = torch.nn.functional.pad(logits, (0, 0, 0, gap))
    response_ids, response_mask, has_eos = truncate_after_eos(new, eos_id, pad_id)
    sampler_logprobs = logprobs_from_logits(logits, response_ids, params.temperature)
    return {
        "response_ids": response_ids,
        "response_mask": response_mask,
        "has_eos": has_eos,
        "sampler_logprobs": sampler_logprobs * response_mask,
    }


def greedy_continuation(
    model: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int,
    eos_id: int, pad_id: int,
) -> torch.Tensor:  # fmt: skip
    """Greedy response ids ``(B, max_new_tokens)`` on the model's device, returned on the CPU
    (the weight-sync parity check between learners and rollout workers)."""
    device = next(model.parameters()).device
    out = sample_responses(model, prompt_ids.to(device), prompt_mask.to(device),
                           SamplingParams(max_new_tokens), eos_id, pad_id, seed=0,
                           greedy=True)  # fmt: skip
    return out["response_ids"].cpu()
