"""Preference pairs (prompt, chosen, rejected) and Anthropic HH-RLHF transcript parsing.

HH-RLHF rows are two full transcripts, ``chosen`` and ``rejected``, made of ``\\n\\nHuman: ...`` /
``\\n\\nAssistant: ...`` turns that share every turn but the final assistant reply. Parsing
departs from a plain split in one way: consecutive turns of the same role (13 of the 2,312
harmless-base test rows have two ``Assistant:`` turns in a row) are merged into one turn, joined
by a blank line, so conversations always alternate. Empty final replies are kept (4 rows of that
split prefer an empty reply).

The same transcript style is the package's default chat format (see ``render_transcript``), so a
prompt rendered here and by ``rlhf_ray.data.tokenization`` is the same text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from rlhf_ray.data.chat_format import ROLE_LABELS, Message, render_transcript
from rlhf_ray.data.sources import load_table, parse_rows, select_columns

__all__ = [
    "DEFAULT_SYSTEM",
    "ROLE_LABELS",
    "Message",
    "PreferencePair",
    "hh_pair",
    "load_preferences",
    "parse_hh_transcript",
    "render_transcript",
]


DEFAULT_SYSTEM = "You are a helpful, honest and harmless assistant."
"""System line put first in every preference prompt unless the caller passes another one."""

_TURN_MARKER = re.compile(r"\n\n(Human|Assistant):")
_LABEL_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass(frozen=True)
class PreferencePair:
    """One comparison: the conversation so far and two candidate assistant replies."""

    prompt: list[Message]
    """Messages (``role`` in system/user/assistant, ``content``), ending with a user turn."""
    chosen: str
    """The preferred final assistant reply (may be empty)."""
    rejected: str
    """The other final assistant reply (may be empty)."""


def parse_hh_transcript(text: str) -> list[Message]:
    """Split an HH transcript into ``[{"role": "user"|"assistant", "content": ...}, ...]``.

    Contents are stripped; consecutive turns of one role are merged (joined by ``"\\n\\n"``).
    Raises ValueError when the text has no turn or has text before its first turn marker.
    """
    if not isinstance(text, str):
        raise ValueError(f"transcript must be a string, got {type(text).__name__}")
    pieces = _TURN_MARKER.split(text)
    if len(pieces) == 1:
        raise ValueError("no '\\n\\nHuman:' or '\\n\\nAssistant:' turn found")
    if pieces[0].strip():
        raise ValueError(
            f"text before the first '\\n\\nHuman:' / '\\n\\nAssistant:' marker: {pieces[0][:60]!r}"
        )
    messages: list[Message] = []
    for label, content in zip(pieces[1::2], pieces[2::2], strict=True):
        role, content = _LABEL_ROLES[label], content.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] = f"{messages[-1]['content']}\n\n{content}".strip()
        else:
            messages.append({"role": role, "content": content})
    return messages


def hh_pair(
    chosen_text: str, rejected_text: str, system: str | None = DEFAULT_SYSTEM
) -> PreferencePair:
    """Turn two HH transcripts into a PreferencePair.

    The turns before each transcript's final assistant reply must be identical; they become the
    prompt (preceded by a system message unless ``system`` is None). Raises ValueError when a
    transcript does not end with an assistant turn, when the prefixes differ, or when the prompt
    is empty.
    """
    chosen, rejected = parse_hh_transcript(chosen_text), parse_hh_transcript(rejected_text)
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns[-1]["role"] != "assistant":
            raise ValueError(f"{name} transcript does not end with an Assistant turn")
        if len(turns) < 2:
            raise ValueError(f"{name} transcript has no Human turn before its final reply")
    prefix = chosen[:-1]
    if prefix != rejected[:-1]:
        first = next(
            (i for i, (a, b) in enumerate(zip(prefix, rejected[:-1], strict=False)) if a != b),
            min(len(prefix), len(rejected) - 1),
        )
        raise ValueError(
            f"chosen and rejected transcripts do not share the prompt: they differ at turn "
            f"{first + 1} ({len(prefix)} vs {len(rejected) - 1} prompt turns)"
        )
    head = [{"role": "system", "content": system}] if system is not None else []
    return PreferencePair(
        prompt=head + prefix, chosen=chosen[-1]["content"], rejected=rejected[-1]["content"]
    )


def _plain_pair(row: dict, system: str | None) -> PreferencePair:
    prompt, chosen, rejected = row.get("prompt"), row.get("chosen"), row.get("rejected")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("field 'prompt' is empty")
        messages = [{"role": "user", "content": prompt.strip()}]
    elif isinstance(prompt, list) and prompt and all(_is_message(m) for m in prompt):
        messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
    else:
        raise ValueError(
            "field 'prompt' must be a non-empty string or a list of {role, content} messages, "
            f"got {_show(prompt)}"
        )
    if not isinstance(chosen, str):
        raise ValueError(f"field 'chosen' must be a string, got {_show(chosen)}")
    if not isinstance(rejected, str):
        raise ValueError(f"field 'rejected' must be a string, got {_show(rejected)}")
    head = [{"role": "system", "content": system}] if system is not None else []
    return PreferencePair(prompt=head + messages, chosen=chosen, rejected=rejected)


def _is_message(m: object) -> bool:
    return (
        isinstance(m, dict) and m.get("role") in ROLE_LABELS and isinstance(m.get("content"), str)
    )


def _show(value: object) -> str:
    return "nothing (missing)" if value is None else f"{type(value).__name__} {value!r:.60}"


def load_preferences(
    path: str,
    fmt: Literal["auto", "hh", "plain"] = "auto",
    skip_bad_rows: bool = False,
    split: str = "train",
    system: str | None = DEFAULT_SYSTEM,
) -> tuple[list[PreferencePair], int]:
    """Load preference pairs from a file (.jsonl, .jsonl.gz, .json, .parquet, .csv), a
    ``save_to_disk`` directory, or a Hub dataset id; returns ``(pairs, num_skipped)``.

    ``fmt="hh"``: rows are ``{"chosen": transcript, "rejected": transcript}`` (see ``hh_pair``).
    ``fmt="plain"``: rows are ``{"prompt": str | messages, "chosen": str, "rejected": str}``.
    ``fmt="auto"``: plain if the data has a ``prompt`` column, else hh.
    A bad row raises ValueError naming the file and the 1-based line (row for non-JSON-lines
    files); with ``skip_bad_rows`` it is counted in ``num_skipped`` instead (the first one is
    logged). Unreadable files always raise.
    """
    if fmt not in ("auto", "hh", "plain"):
        raise ValueError(f"fmt must be 'auto', 'hh' or 'plain', got {fmt!r}")
    table, where = load_table(path, split=split)
    columns = set(table.column_names)
    if fmt == "auto":
        fmt = "plain" if "prompt" in columns else "hh"
    needed = ["chosen", "rejected"] + (["prompt"] if fmt == "plain" else [])
    data = select_columns(table, where, needed, f"{fmt!r} preference data needs {needed}")

    def parse(i: int) -> PreferencePair:
        row = {c: data[c][i] for c in needed}
        if fmt == "hh":
            return hh_pair(row["chosen"], row["rejected"], system=system)
        return _plain_pair(row, system)

    return parse_rows(
        table.num_rows, parse, where, skip_bad_rows, ("preference", "preference pairs")
    )
