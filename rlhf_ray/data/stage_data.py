"""Examples of the stages before PPO: supervised replies (sft) and preference pairs (train-rm).

Both are conversations plus assistant replies, rendered with the tokenizer's chat format
(``Tokenizer.apply_chat``; the default is the HH-RLHF transcript, the same text PPO's HH prompts
use) and encoded the way PPO's rollouts are: the prompt text ``apply_chat(prompt, True)``
exactly as PPO encodes its prompts (``tokenization.encode_prompt``: the tokenizer's default
special tokens, so BOS first for Llama-style tokenizers, as ``AutoTokenizer(...)(text)``
gives), then the reply text (what ``apply_chat`` adds for the assistant turn, e.g.
``" " + reply`` in the transcript format) encoded on its own, then EOS. The prompt keeps its
head (BOS, the template's start) and its last ``max_prompt_tokens`` tokens.

Too long for ``max_tokens``:
- SFT: the sequence is cut at the end of the reply (the cut reply is learnt without EOS).
- Preference pairs: the EOS is always kept, where PPO's reward is read (TRL's "keep_end" for
  the prompt): the prompt is cut further from the left, down to its head; only a reply too long
  even then loses its end, EOS still appended (as ``reward.append_eos`` does for a PPO response
  cut before EOS). No pair is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from rlhf_ray.data.preference import (
    ROLE_LABELS,
    Message,
    PreferencePair,
    load_preferences,
    parse_hh_transcript,
)
from rlhf_ray.data.sources import load_table, parse_rows, select_columns
from rlhf_ray.data.tokenization import (
    Tokenizer,
    chat_template_start,
    encode_prompt,
    left_pad,
    prompt_head,
)
from rlhf_ray.types import PairBatch, SFTBatch

__all__ = [
    "SFTExample",
    "encode_pairs",
    "encode_sft",
    "held_out_split",
    "load_sft_examples",
    "render_for",
    "reply_text",
]


SFTFormat = Literal["auto", "hh", "plain", "messages"]


@dataclass(frozen=True)
class SFTExample:
    """A conversation ending with a user turn and the assistant reply to learn."""

    prompt: list[Message]
    response: str


def _hh_example(row: dict) -> SFTExample:
    turns = parse_hh_transcript(row["chosen"])
    if turns[-1]["role"] != "assistant" or len(turns) < 2:
        raise ValueError("transcript does not end with an Assistant reply after a Human turn")
    return SFTExample(prompt=turns[:-1], response=turns[-1]["content"])


def _plain_example(row: dict) -> SFTExample:
    prompt, response = row["prompt"], row["response"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"field 'prompt' must be a non-empty string, got {prompt!r:.60}")
    if not isinstance(response, str):
        raise ValueError(f"field 'response' must be a string, got {response!r:.60}")
    return SFTExample(prompt=[{"role": "user", "content": prompt.strip()}], response=response)


def _messages_example(row: dict) -> SFTExample:
    messages = row["messages"]
    ok = isinstance(messages, list) and all(
        isinstance(m, dict) and m.get("role") in ROLE_LABELS and isinstance(m.get("content"), str)
        for m in messages
    )
    if not ok or len(messages) < 2:
        raise ValueError("field 'messages' must be a list of at least two {role, content} messages")
    if messages[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant reply to learn")
    prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
    return SFTExample(prompt=prompt, response=messages[-1]["content"])


_SFT_PARSERS = {
    "hh": (["chosen"], _hh_example),
    "plain": (["prompt", "response"], _plain_example),
    "messages": (["messages"], _messages_example),
}


def load_sft_examples(
    path: str, fmt: SFTFormat = "auto", split: str = "train", skip_bad_rows: bool = False
) -> tuple[list[SFTExample], int]:
    """Supervised examples from a file, directory, ``builtin:hh-rlhf`` or Hub id; returns
    ``(examples, num_skipped)``. ``fmt="auto"``: ``messages`` if that column exists, else
    ``plain`` if ``prompt`` and ``response`` do, else ``hh`` (the ``chosen`` transcripts).
    A bad row raises ValueError naming the file and line unless ``skip_bad_rows``."""
    table, where = load_table(path, split=split)
    columns = set(table.column_names)
    if fmt == "auto":
        fmt = (
            "messages"
            if "messages" in columns
            else "plain"
            if {"prompt", "response"} <= columns
            else "hh"
        )
    if fmt not in _SFT_PARSERS:
        raise ValueError(f"fmt must be 'auto', 'hh', 'plain' or 'messages', got {fmt!r}")
    needed, parse = _SFT_PARSERS[fmt]
    data = select_columns(table, where, needed, f"{fmt!r} SFT data needs {needed}")
    return parse_rows(
        table.num_rows,
        lambda i: parse({c: data[c][i] for c in needed}),
        where,
        skip_bad_rows,
        ("SFT", "SFT examples"),
    )


def load_pairs(
    path: str, fmt: Literal["auto", "hh", "plain"], split: str, skip_bad_rows: bool
) -> tuple[list[PreferencePair], int]:
    """``load_preferences`` with no system line (PPO's HH prompts have none either)."""
    return load_preferences(path, fmt, skip_bad_rows=skip_bad_rows, split=split, system=None)


def held_out_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``(train, eval)`` row indices: a seeded random ``fraction`` of ``range(n)`` held out
    (at least one row when ``fraction > 0``, never all of them); both lists sorted."""
    if fraction <= 0:
        return list(range(n)), []
    n_eval = min(n - 1, max(1, round(n * fraction)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[n_eval:]), sorted(perm[:n_eval])


def reply_text(tokenizer: Tokenizer, prompt: Sequence[Message], reply: str) -> tuple[str, str]:
    """``(prompt_text, reply_text)``: the generation prompt, and what the chat format adds for
    the assistant's ``reply`` after it (``" " + reply`` for the HH transcript format)."""
    prompt_text = tokenizer.apply_chat(list(prompt), add_generation_prompt=True)
    full = tokenizer.apply_chat(
        [*prompt, {"role": "assistant", "content": reply}], add_generation_prompt=False
    )
    return prompt_text, full[len(prompt_text) :] if full.startswith(prompt_text) else reply


def render_for(tokenizer: Tokenizer, prompt_text: str, response: str) -> tuple[str, str]:
    """``(prompt_text, reply_text)`` of a PPO sample in ``tokenizer``'s own chat format, as
    train-rm gave that tokenizer's reward model its pairs (``reply_text``).

    A prompt in the default HH-transcript format (ending in ``"\n\nAssistant:"``) is parsed
    back into its turns and re-rendered with ``tokenizer.apply_chat`` when that gives another
    text (a reward model with its own chat template); any other prompt, or one the format
    already matches, is kept as it is, the response after it unchanged."""
    if not prompt_text.endswith("\n\nAssistant:"):
        return prompt_text, response
    try:
        turns = parse_hh_transcript(prompt_text)
    except ValueError:
        return prompt_text, response
    if turns and turns[-1] == {"role": "assistant", "content": ""}:
        turns = turns[:-1]
    if not turns or tokenizer.apply_chat(turns, add_generation_prompt=True) == prompt_text:
        return prompt_text, response
    return reply_text(tokenizer, turns, response.strip())


def _encode(
    tokenizer: Tokenizer, prompt: Sequence[Message], reply: str, max_prompt: int
) -> tuple[list[int], list[int]]:
    """Token ids of the prompt (as PPO encodes it, at most ``max_prompt``) and of the reply."""
    prompt_text, reply_part = reply_text(tokenizer, prompt, reply)
    start = chat_template_start(tokenizer)
    prompt_ids, _ = encode_prompt(tokenizer, prompt_text, max_prompt, start)
    return prompt_ids, tokenizer.encode(reply_part)


def _sequence(
    tokenizer: Tokenizer, prompt: Sequence[Message], reply: str, max_tokens: int, max_prompt: int
) -> tuple[list[int], int]:
    """Token ids of prompt + reply + EOS cut at the end, and how many are the prompt's."""
    prompt_ids, reply_ids = _encode(tokenizer, prompt, reply, max_prompt)
    ids = (prompt_ids + reply_ids + [tokenizer.eos_id])[:max_tokens]
    return ids, len(prompt_ids)


def _pair_sequence(
    tokenizer: Tokenizer, prompt: Sequence[Message], reply: str, max_tokens: int, max_prompt: int
) -> list[int]:
    """Prompt + reply + EOS within ``max_tokens``, EOS always last (module docstring)."""
    reply_len = len(_encode(tokenizer, prompt, reply, max_prompt)[1])
    shortest = len(prompt_head(tokenizer, chat_template_start(tokenizer))) + 1
    room = max(shortest, max_tokens - reply_len - 1)
    prompt_ids, reply_ids = _encode(tokenizer, prompt, reply, min(max_prompt, room))
    return prompt_ids + reply_ids[: max_tokens - len(prompt_ids) - 1] + [tokenizer.eos_id]


def encode_sft(
    examples: Sequence[SFTExample], tokenizer: Tokenizer, max_tokens: int, max_prompt_tokens: int
) -> SFTBatch:
    """Left-padded sequences whose ``loss_mask`` is 1 exactly on the reply tokens and EOS."""
    seqs = [
        _sequence(tokenizer, ex.prompt, ex.response, max_tokens, max_prompt_tokens)
        for ex in examples
    ]
    input_ids, attention_mask = left_pad([ids for ids, _ in seqs], tokenizer.pad_id, max_tokens)
    loss_mask = torch.zeros_like(attention_mask)
    width = input_ids.shape[1]
    for row, (ids, n_prompt) in enumerate(seqs):
        loss_mask[row, width - len(ids) + n_prompt :] = 1
    return SFTBatch(input_ids, attention_mask, loss_mask)


def encode_pairs(
    pairs: Sequence[PreferencePair], tokenizer: Tokenizer, max_tokens: int, max_prompt_tokens: int
) -> PairBatch:
    """Chosen and rejected sequences (prompt + reply + EOS, EOS kept when too long: see the
    module docstring), left-padded to one width."""
    chosen = [
        _pair_sequence(tokenizer, p.prompt, p.chosen, max_tokens, max_prompt_tokens) for p in pairs
    ]
    rejected = [
        _pair_sequence(tokenizer, p.prompt, p.rejected, max_tokens, max_prompt_tokens)
        for p in pairs
    ]
    ids, mask = left_pad(chosen + rejected, tokenizer.pad_id, max_tokens)
    n = len(pairs)
    return PairBatch(ids[:n], mask[:n], ids[n:], mask[n:])
