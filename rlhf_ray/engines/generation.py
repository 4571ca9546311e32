"""Sampling responses with the KV-cached Hugging Face ``generate``.

Prompts arrive left-padded; ``generate`` derives positions from the mask itself, so no position
ids are passed. Each row is sampled with its own generator (``RowSampler``), from the
distribution the learner's log-probs use (``algo.sampling``), vectorised over the batch. A
worker generates its whole shard in one ``generate`` call by default (``chunk_rows`` cuts it
into fixed chunks, for bit-identical rollouts on any pool size: ``rollout.micro_batch_size``).
``generate`` stops once every row has ended; each response is truncated after its first EOS and
the returned tensors always have exactly ``max_new_tokens`` columns so that shards from
different workers concatenate.

The generation config is built from our sampling settings alone: the model's own
``generation_config`` (a shipped ``repetition_penalty``, ``no_repeat_ngram_size``, ``num_beams``,
...) is set aside during the call, since transformers fills every unset field from it and the
samples would then come from a distribution the learner's log-probs do not describe.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from rlhf_ray.algo import inverse_cdf_sample, process_logits, row_uniforms, truncate_after_eos


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


class RowSampler:
    """Samples each row from its own uniforms, and records what it sampled from.

    A logits processor: ``generate`` calls any ``(input_ids, scores) -> scores`` callable in its
    ``LogitsProcessorList`` (transformers is imported by the functions below, not here: its
    generation package costs a process that samples nothing, such as the driver, seconds).

    ``generate`` runs greedy with this as its logits processor: it turns the raw scores into
    the processed distribution (``algo.process_logits``: temperature, top-k, top-p), records
    the log-probs of that distribution, draws row ``i``'s token by inverse-CDF sampling with
    ``uniforms[i, step]`` (``algo.inverse_cdf_sample``, one vectorised call for the batch) and
    returns scores whose argmax is that token. ``generate`` shares one RNG across a batch;
    ``uniforms`` come from per-row generators (``algo.row_uniforms``), so a row's sample depends
    on its seed only, not on its batch-mates. Without uniforms it stays greedy."""

    def __init__(self, params: SamplingParams, uniforms: torch.Tensor | None):
        self.params, self.uniforms = params, uniforms
        self.logprobs: list[torch.Tensor] = []  # one (B,) per step

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        p = self.params
        logp = torch.log_softmax(process_logits(scores, p.temperature, p.top_k, p.top_p), -1)
        if self.uniforms is None:
            chosen = logp.argmax(-1, keepdim=True)
        else:
            chosen = inverse_cdf_sample(logp, self.uniforms[:, len(self.logprobs)])
        self.logprobs.append(logp.gather(-1, chosen).squeeze(-1))
        # scores whose argmax (generate's greedy step) is the chosen token
        return logp.fill_(float("-inf")).scatter_(-1, chosen, 0.0)  # type: ignore[return-value]


@contextmanager
def own_generation_config(model: Any) -> Iterator[None]:
    """Set the model's ``generation_config`` aside (a neutral one in its place) while inside,
    so that ``generate`` takes nothing from it; restored on exit."""
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


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
        _sample_chunk(
            model,
            prompt_ids[i : i + step],
            prompt_mask[i : i + step],
            params,
            eos_id,
            pad_id,
            None if seeds is None else seeds[i : i + step],
        )
        for i in range(0, rows, step)
    ]
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def _sample_chunk(
    model: Any,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    params: SamplingParams,
    eos_id: int,
    pad_id: int,
    seeds: list[int] | None,
) -> dict[str, torch.Tensor]:
    from transformers import GenerationConfig, LogitsProcessorList

    uniforms = None
    if seeds is not None:
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        uniforms = row_uniforms(generators, params.max_new_tokens).to(prompt_ids.device)
    sampler = RowSampler(params, uniforms)
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=params.max_new_tokens,
        min_new_tokens=0,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    with own_generation_config(model):
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
    model: Any,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
) -> torch.Tensor:
    """Greedy response ids ``(B, max_new_tokens)`` on the model's device, returned on the CPU
    (the weight-sync parity check between learners and rollout workers)."""
    device = next(model.parameters()).device
    out = sample_responses(
        model,
        prompt_ids.to(device),
        prompt_mask.to(device),
        SamplingParams(max_new_tokens),
        eos_id,
        pad_id,
        seeds=None,
    )
    return out["response_ids"].cpu()
