"""Token log-probabilities of responses under a causal LM, for left-padded prompts.

transformers does not derive positions from the attention mask in a plain forward, so every
scoring forward passes ``position_ids = cumsum(mask) - 1`` (measured: logits moved by up to 0.61 without it); ``generate`` does this
itself. Logits are divided by the sampling temperature before the softmax, in every logprob
computation (policy, old, reference), as the sampler did. The policy's log-probs for the PPO
ratio also take the sampler's top-k / top-p (``algo.sampling``): the ratio must be taken against
the distribution that drew the samples. Everything KL, and the entropy, uses the full
temperature-scaled distribution, as the reference does (veRL, TRL): under top-p the filtered
log-prob of a kept token is ``log p - log(kept mass)``, so a KL from it would be
``-log(kept mass) > 0`` per token even at policy == reference. ``full`` returns those.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from rlhf_ray.algo import entropy_of_logprobs, entropy_of_scores, label_logprobs, process_logits

HEAD_CHUNK_TOKENS = 1024  # response positions the LM head runs on at a time (models/memory.py)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` positions counting real tokens only (left pads get 0; causal attention makes
    the value at trailing pads irrelevant)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` index of the last real token of each row (any padding side)."""
    T = attention_mask.shape[1]
    return T - 1 - attention_mask.long().flip(-1).argmax(-1)


def _hidden_and_head(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """Last hidden states ``(B, T, H)`` and the function from hidden states to logits.

    The LM head is applied later, a chunk of tokens at a time, so the ``(B, T, V)`` logits never
    exist at once. A model whose logits are more than ``lm_head(hidden)`` (soft-capping, a logit
    scale) takes the plain forward instead."""
    position_ids = position_ids_from_mask(attention_mask)
    if hasattr(model, "get_base_model"):  # a PeftModel: the HF model inside, adapters in place
        model = model.get_base_model()
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    plain = head is None or any(
        getattr(config, key, None) not in (None, 1.0)
        for key in ("final_logit_softcapping", "logit_scale", "logits_scaling")
    )
    if plain:
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )
        return out.logits, lambda x: x
    out = model.base_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    )
    assert head is not None
    return out.last_hidden_state, head


def _chunk_logprobs(
    head: Callable[[torch.Tensor], torch.Tensor],
    temperature: float,
    top_k: int,
    top_p: float,
    with_entropy: bool,
    entropy_grad: bool,
    h: torch.Tensor,
    y: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """One chunk of ``response_logprobs``: hidden states ``h (N, H)`` and labels ``y (N,)`` ->
    (log-probs, outside the filter, full log-probs[, entropy]), each ``(N,)``.

    One log-softmax of the full distribution serves the full log-probs, a logged entropy and,
    without a filter, the log-probs themselves; only a differentiable entropy (``entropy_grad``
    with gradients on) takes its own."""
    scaled = head(h).float() / temperature
    index = y.unsqueeze(-1)
    full_all = torch.log_softmax(scaled, -1)
    full_logp = full_all.gather(-1, index).squeeze(-1)
    if bool(top_k) or top_p < 1.0:
        logp, out = label_logprobs(scaled, process_logits(scaled, 1.0, top_k, top_p), y)
    else:  # what label_logprobs gives when nothing is filtered, from the same log-softmax
        logp, out = full_logp, torch.isinf(scaled.gather(-1, index)).squeeze(-1)
    if not with_entropy:
        return logp, out, full_logp
    if torch.is_grad_enabled() and entropy_grad:
        return logp, out, full_logp, entropy_of_scores(scaled)
    with torch.no_grad():
        return logp, out, full_logp, entropy_of_logprobs(full_all)


def response_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_len: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    top_k: int = 0,
    top_p: float = 1.0,
    chunk_tokens: int = HEAD_CHUNK_TOKENS,
    entropy_grad: bool = True,
    outside: list[torch.Tensor] | None = None,
    full: list[torch.Tensor] | None = None,
    recompute: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs ``(B, R)`` of the response tokens ``input_ids[:, prompt_len:]`` under the
    processed distribution (temperature, top-k, top-p: ``algo.process_logits``).

    The logits at position ``t`` predict token ``t + 1``, so the response's logits are
    ``[prompt_len - 1, T - 1)``. They are computed ``chunk_tokens`` tokens at a time from the
    hidden states, so no full ``(B, R, V)`` float32 tensor exists; with gradients on and more
    than one chunk, each chunk is recomputed in the backward pass (activation checkpointing)
    rather than kept (``recompute``: None decides so; a single chunk is kept, since its
    recomputation would lower no peak: it is live again at the start of the backward).
    Returns the per-token entropy ``(B, R)`` of the FULL temperature-scaled distribution (not
    the filtered one; comparable with peers' figures) too if asked (``with_entropy``; it
    carries a graph only when gradients are on and ``entropy_grad``; otherwise it is read off
    the log-softmax the log-probs already took, so a logged entropy costs no second one). ``outside``, if given, receives a ``(B, R)``
    bool tensor: labels that fell outside the filtered set. ``full``, if given, receives the
    ``(B, R)`` log-probs under the full temperature-scaled distribution (what the KL uses; the
    same tensor as the first output when top-k and top-p are off).
    """
    hidden, head = _hidden_and_head(model, input_ids, attention_mask)
    B, R = input_ids.shape[0], input_ids.shape[1] - prompt_len
    flat = hidden[:, prompt_len - 1 : -1].reshape(B * R, -1)
    labels = input_ids[:, prompt_len:].reshape(B * R)

    chunk = functools.partial(
        _chunk_logprobs, head, temperature, top_k, top_p, with_entropy, entropy_grad
    )
    # A frozen head partitioned by ZeRO-3 (LoRA) is not gathered again when a checkpointed chunk
    # is recomputed in the backward pass (torch's checkpoint refuses the empty partition), so
    # those chunks keep their activations instead
    weight = getattr(head, "weight", None)
    frozen_zero3 = hasattr(weight, "ds_id") and not getattr(weight, "requires_grad", True)
    recompute = (chunk_tokens < B * R if recompute is None else recompute) and not frozen_zero3
    results = []
    for i in range(0, B * R, chunk_tokens):
        h, y = flat[i : i + chunk_tokens], labels[i : i + chunk_tokens]
        if torch.is_grad_enabled() and h.requires_grad and recompute:
            results.append(checkpoint(chunk, h, y, use_reentrant=False))
        else:
            results.append(chunk(h, y))
    columns = [torch.cat(parts).reshape(B, R) for parts in zip(*results, strict=True)]
    if outside is not None:
        outside.append(columns[1].detach())
    if full is not None:
        full.append(columns[2])
    return columns[0], (columns[3] if with_entropy else None)
