"""Token log-probabilities of responses under a causal LM, for left-padded prompts.

transformers does not derive positions from the attention mask in a plain forward, so every
scoring forward passes ``position_ids = cumsum(mask) - 1`` (PLATFORM.md); ``generate`` does this
itself. Logits are divided by the sampling temperature before the softmax, in every logprob
computation (policy, old, reference), as the sampler did.
"""

from __future__ import annotations

import torch
from torch import nn

from rlhf_ray.algo import entropy_from_logits


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` positions counting real tokens only (left pads get 0; causal attention makes
    the value at trailing pads irrelevant)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` index of the last real token of each row (any padding side)."""
    T = attention_mask.shape[1]
    return T - 1 - attention_mask.long().flip(-1).argmax(-1)


def logprobs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``logits (B, T, V)``, ``labels (B, T)`` -> ``(B, T)`` log p(label) at that temperature."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def response_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_len: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs ``(B, R)`` of the response tokens ``input_ids[:, prompt_len:]``.

    The logits at position ``t`` predict token ``t + 1``, so the response's logits are
    ``[prompt_len - 1, T - 1)``. Returns the per-token entropy ``(B, R)`` too if asked.
    """
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    logits = out.logits[:, prompt_len - 1 : -1].float() / temperature
    logprobs = logprobs_from_logits(logits, input_ids[:, prompt_len:])
    entropy = entropy_from_logits(logits) if with_entropy else None
    return logprobs, entropy
