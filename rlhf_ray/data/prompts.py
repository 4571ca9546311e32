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

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from rlhf_ray.data.preference import hh_pair, render_transcript
from rlhf_ray.data.sources import BUILTIN_PROMPTS, load_table, select_columns

__all__ = [
    "BUILTIN_PROMPTS",
    "PromptSet",
    "load_prompt_conversations",
    "load_prompt_set",
    "load_prompts",
]

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


@dataclass(frozen=True)
class PromptSet:
    """Prompts as conversations, the format they were read as, and the rows skipped."""

    format: str
    conversations: list[list[dict[str, str]]]
    skipped: list[str] = dataclasses.field(default_factory=list)
    """``"<file>, line N: problem"`` for each bad row dropped under ``on_bad_row="skip"``."""
    columns: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """Per prompt, its row's other fields (for HH rows ``chosen``/``rejected`` are the final
    replies): what a reward function or a remote reward receives beside the prompt."""
    column_names: tuple[str, ...] = ()
    """The names every row of ``columns`` has."""


def load_prompt_set(
    source: str = BUILTIN_PROMPTS,
    field: str = "prompt",
    split: str = "train",
    fmt: str = "auto",
    on_bad_row: str = "error",
) -> PromptSet:
    """Like ``load_prompt_conversations``; a bad row (unreadable line, prompt missing, empty or
    not a string, an HH pair without a shared prefix) raises ValueError naming the file, the
    line and the field, or with ``on_bad_row="skip"`` is dropped and listed in ``skipped``."""
    if fmt not in ("auto", "plain", "hh"):
        raise ValueError(f"fmt must be 'auto', 'plain' or 'hh', got {fmt!r}")
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    skip = on_bad_row == "skip"
    table, where = load_table(source, split=split, skip_bad_lines=skip)
    columns = set(table.column_names)
    if fmt == "auto":
        fmt = "hh" if {"chosen", "rejected"} <= columns and field not in columns else "plain"
    needed = ["chosen", "rejected"] if fmt == "hh" else [field]
    select_columns(table, where, needed, "set the prompt field or fmt")
    extra = sorted(columns - {field}) if fmt == "plain" else sorted(columns)
    data = {c: table[c] for c in {*needed, *extra}}
    conversations, rows = [], []
    skipped = list(where.skipped)
    for i in range(table.num_rows):
        try:
            conversations.append(_conversation(data, i, fmt, field))
            rows.append(_columns(data, i, extra, fmt))
        except ValueError as e:
            if not skip:
                raise ValueError(f"{where.describe(i)}: {e}") from None
            skipped.append(f"{where.describe(i)}: {e}")
    if not conversations:
        raise ValueError(f"{where.source}: no prompts ({len(skipped)} bad rows skipped)")
    return PromptSet(fmt, conversations, skipped, rows, tuple(extra))


def _columns(data: dict[str, list], i: int, names: list[str], fmt: str) -> dict[str, Any]:
    """Row ``i``'s per-prompt fields; an HH row's ``chosen``/``rejected`` become its final
    replies (the transcripts' shared prefix is the prompt)."""
    row = {name: data[name][i] for name in names}
    if fmt == "hh":
        pair = hh_pair(data["chosen"][i], data["rejected"][i], system=None)
        row["chosen"], row["rejected"] = pair.chosen, pair.rejected
    return row


def _conversation(data: dict[str, list], i: int, fmt: str, field: str) -> list[dict[str, str]]:
    if fmt == "hh":
        return hh_pair(data["chosen"][i], data["rejected"][i], system=None).prompt
    value = data[field][i]
    if not isinstance(value, str) or not value.strip():
        problem = "missing" if value is None else f"empty or not a string ({value!r:.40})"
        raise ValueError(f"field {field!r} is {problem}")
    return [{"role": "user", "content": value.strip()}]


def _load(source: str, field: str, split: str, fmt: str) -> tuple[str, list[list[dict[str, str]]]]:
    loaded = load_prompt_set(source, field, split, fmt)
    return loaded.format, loaded.conversations
