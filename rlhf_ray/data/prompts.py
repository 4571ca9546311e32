"""Prompt datasets for PPO rollouts.

Two views of the same rows:

- ``load_prompt_conversations`` returns chat messages, ready for ``Tokenizer.apply_chat``:
  a plain row becomes one user message; an HH-RLHF row becomes the turns shared by its
  ``chosen`` and ``rejected`` transcripts (everything before the final assistant reply).
- ``load_prompts`` returns strings: the stripped user text for plain rows, and for HH rows the
  shared prefix rendered as an HH transcript ending in ``"\\n\\nAssistant:"`` (already formatted:
  do not wrap it in a chat template again).
"""

from __future__ import annotations

from typing import Literal

from rlhf_ray.data.preference import hh_pair, render_transcript
from rlhf_ray.data.sources import BUILTIN_PROMPTS, load_table, select_columns

__all__ = ["BUILTIN_PROMPTS", "load_prompt_conversations", "load_prompts"]

PromptFormat = Literal["auto", "plain", "hh"]


def load_prompt_conversations(
    source: str = BUILTIN_PROMPTS,
    field: str = "prompt",
    split: str = "train",
    fmt: PromptFormat = "auto",
    system: str | None = None,
) -> list[list[dict[str, str]]]:
    """Load prompts as conversations (lists of ``{"role", "content"}`` messages).

    ``source``: ``"builtin"``, a local file/directory or a Hub id (see ``rlhf_ray.data.sources``).
    ``fmt="plain"`` reads the string column ``field``; ``fmt="hh"`` reads ``chosen``/``rejected``
    transcripts; ``"auto"`` picks hh when the data has ``chosen`` and ``rejected`` but no
    ``field``. ``system``, if given, is put first in every conversation. A missing or empty
    prompt raises ValueError naming the file, the field and the 1-based line/row.
    """
    _, conversations = _load(source, field, split, fmt)
    head = [{"role": "system", "content": system}] if system is not None else []
    return [head + c for c in conversations]


def load_prompts(
    source: str = BUILTIN_PROMPTS,
    field: str = "prompt",
    split: str = "train",
    fmt: PromptFormat = "auto",
) -> list[str]:
    """Load prompts as strings (see the module docstring for what each format yields).

    Same sources, auto-detection and errors as ``load_prompt_conversations``.
    """
    resolved, conversations = _load(source, field, split, fmt)
    if resolved == "plain":
        return [c[0]["content"] for c in conversations]
    return [render_transcript(c, add_generation_prompt=True) for c in conversations]


def _load(source: str, field: str, split: str, fmt: str) -> tuple[str, list[list[dict[str, str]]]]:
    if fmt not in ("auto", "plain", "hh"):
        raise ValueError(f"fmt must be 'auto', 'plain' or 'hh', got {fmt!r}")
    table, where = load_table(source, split=split)
    columns = set(table.column_names)
    if fmt == "auto":
        fmt = "hh" if {"chosen", "rejected"} <= columns and field not in columns else "plain"
    needed = ["chosen", "rejected"] if fmt == "hh" else [field]
    data = select_columns(table, where, needed, "set the prompt field or fmt")
    conversations = []
    for i in range(table.num_rows):
        if fmt == "hh":
            try:
                pair = hh_pair(data["chosen"][i], data["rejected"][i], system=None)
            except ValueError as e:
                raise ValueError(f"{where.describe(i)}: {e}") from None
            conversations.append(pair.prompt)
            continue
        value = data[field][i]
        if not isinstance(value, str) or not value.strip():
            problem = "missing" if value is None else f"empty or not a string ({value!r:.40})"
            raise ValueError(f"{where.describe(i)}: field {field!r} is {problem}")
        conversations.append([{"role": "user", "content": value.strip()}])
    if not conversations:
        raise ValueError(f"{where.source}: no prompts")
    return fmt, conversations
