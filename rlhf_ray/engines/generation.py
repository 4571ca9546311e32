"""Sampling responses with the KV-cached Hugging Face ``generate``.

Prompts arrive left-padded; ``generate`` derives positions from the mask itself, so no position
ids are passed. Each row is sampled with its own generator (``RowSampler``), from
the distribution the learner's log-probs use (``algo.sampling``). Every response is sampled up to ``max_new_tokens``, then truncated
after its first EOS; the returned tensors always have exactly ``max_new_tokens`` columns so that
shards from different workers concatenate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from rlhf_ray.algo import gumbel_noise, process_logits, truncate_after_eos


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


class RowSampler(LogitsProcessor):
    """Samples each row from its own generator, and records what it sampled from.

    ``generate`` runs greedy with this as its logits processor: it turns the raw scores into
    the processed distribution (``algo.process_logits``: temperature, top-k, top-p), records
    the log-probs of that distribution, and adds Gumbel noise drawn from the row's own
    generator, so that greedy's argmax is a sample of the processed distribution (the
    Gumbel-max trick). ``generate`` shares one RNG across a batch; this makes a row's sample
    depend on its seed only, not on its batch-mates. Without generators it stays greedy."""

    def __init__(self, params: SamplingParams, generators: list[torch.Generator] | None):
        self.params, self.generators = params, generators
        self.logprobs: list[torch.Tensor] = []  # one (B,) per step

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        p = self.params
        logp = torch.log_softmax(process_logits(scores, p.temperature, p.top_k, p.top_p), -1)
        if self.generators is not None:
            logp_noisy = logp + gumbel_noise(self.generators, logp.shape[-1], logp.device)
        else:
            logp_noisy = logp
        chosen = logp_noisy.argmax(-1, keepdim=True)
        self.logprobs.append(logp.gather(-1, chosen).squeeze(-1))
        return logp_noisy  # type: ignore[return-value]


@torch.no_grad()
def sample_responses(
    model: Any,  # a transformers model (it has .generate)
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    params: SamplingParams,
    eos_id: int,
    pad_id: int,
    seeds: list[int] | None,
    chunk_rows: int | None = None,
) -> dict[str, torch.Tensor]:
    """Sample one response per prompt row, row ``i`` seeded by ``seeds[i]`` alone (greedy when
    ``seeds`` is None), ``chunk_rows`` rows per ``generate`` call (all at once: None).

    Returns ``response_ids (B, R)`` (pad after the first EOS), ``response_mask (B, R)``,
    ``has_eos (B,)`` and the sampler's own ``sampler_logprobs (B, R)``: the log-probs of the
    distribution it sampled from (after temperature, top-k and top-p), for the sampler/learner
    gap.
    """
    rows = len(prompt_ids)
    step = chunk_rows or max(rows, 1)
    parts = [
        _sample_chunk(model, prompt_ids[i : i + step], prompt_mask[i : i + step], params,
                      eos_id, pad_id, None if seeds is None else seeds[i : i + step])
        for i in range(0, rows, step)
    ]  # fmt: skip
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def _sample_chunk(
    model: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, params: SamplingParams,
    eos_id: int, pad_id: int, seeds: list[int] | None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    device = prompt_ids.device
    generators = None
    if seeds is not None:
        generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    sampler = RowSampler(params, generators)
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=params.max_new_tokens,
        min_new_tokens=0,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    new = model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        generation_config=config,
        logits_processor=LogitsProcessorList([sampler]),
    )[:, prompt_ids.shape[1] :]
    logprobs = torch.stack(sampler.logprobs, dim=1)
    gap = params.max_new_tokens - new.shape[1]
    if gap > 0:  # every row finished early: pad to the fixed width
        new = torch.nn.functional.pad(new, (0, gap), value=pad_id)
        logprobs = torch.nn.functional.pad(logprobs, (0, gap))
    response_ids, response_mask, has_eos = truncate_after_eos(new, eos_id, pad_id)
    return {
        "response_ids": response_ids,
        "response_mask": response_mask,
        "has_eos": has_eos,
        "sampler_logprobs": logprobs * response_mask,
    }


def greedy_continuation(
    model: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int,
    eos_id: int, pad_id: int,
) -> torch.Tensor:  # fmt: skip
    """Greedy response ids ``(B, max_new_tokens)`` on the model's device, returned on the CPU
    (the weight-sync parity check between learners and rollout workers)."""
    device = next(model.parameters()).device
    out = sample_responses(model, prompt_ids.to(device), prompt_mask.to(device),
                           SamplingParams(max_new_tokens), eos_id, pad_id, seeds=None)  # fmt: skip
    return out["response_ids"].cpu()
