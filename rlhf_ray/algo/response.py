"""Post-processing of sampled responses (Huang et al. 2022, "The N Implementation Details of RLHF
with PPO"): sample to max_new_tokens, cut after the first EOS, optionally mark down no-EOS rows,
and close the rows that have none before a reward model reads them."""

from __future__ import annotations

import torch


def truncate_after_eos(
    response_ids: torch.Tensor, eos_id: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep tokens up to and including the first EOS; pad the rest.

    response_ids: `(B, T)` long. Returns (ids `(B, T)`, response_mask `(B, T)` long, has_eos `(B,)`
    bool). response_mask is 1 up to and including the first EOS, or on the whole row if no EOS.
    """
    is_eos = response_ids == eos_id
    has_eos = is_eos.any(dim=1)
    T = response_ids.shape[1]
    # argmax returns the first maximal index, i.e. the first EOS.
    first_eos = torch.where(has_eos, is_eos.long().argmax(dim=1), T - 1)
    positions = torch.arange(T, device=response_ids.device)
    keep = positions[None, :] <= first_eos[:, None]
    ids = torch.where(keep, response_ids, torch.full_like(response_ids, pad_id))
    return ids, keep.long(), has_eos


def apply_missing_eos_penalty(
    scores: torch.Tensor, has_eos: torch.Tensor, penalty: float | None
) -> torch.Tensor:
    """Subtract `penalty` from the score `(B,)` of each response with no EOS (as TRL's
    `missing_eos_penalty` does); None leaves scores as is.

    The reward model never sees such a response end, so it is marked down by a fixed amount
    rather than replaced: the ranking among unfinished responses is kept.
    """
    if penalty is None:
        return scores
    return torch.where(has_eos, scores, scores - penalty)


def append_eos(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    has_eos: torch.Tensor,
    eos_id: int,
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt + response rows ``(B, T)`` (responses right-padded after their EOS) with one more
    column: EOS after each row that has none (``has_eos`` False: its response filled all its
    columns), padding after the others. Returns ``(input_ids, attention_mask)``, ``(B, T + 1)``.

    A reward model trained on finished replies (prompt + reply + EOS) is read at an EOS this
    way, even for a response cut at ``max_new_tokens`` (OpenRLHF writes that EOS in place).
    """
    missing = ~has_eos.to(torch.bool)
    column = torch.where(missing, eos_id, pad_id).to(input_ids.dtype)
    ids = torch.cat([input_ids, column[:, None]], dim=1)
    mask = torch.cat([attention_mask, missing[:, None].to(attention_mask.dtype)], dim=1)
    return ids, mask
