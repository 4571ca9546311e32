"""Reward functions the reward tests name as ``tests.helpers.reward_fns:...`` (importable by Ray actors,
whose path holds the repository root)."""

from __future__ import annotations

import json
import string
from pathlib import Path

LOWER = set(string.ascii_lowercase + " ")
LETTERS = set(string.ascii_letters + " ")


def labelled_prompts(path: Path, n: int = 16) -> Path:
    """A JSONL prompt set whose rows carry a ``label`` column naming the prompt's item."""
    rows = [{"prompt": f"Tell me about item {i}.", "label": str(i)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def label_term(prompts: list[str], responses: list[str], label: list[str]) -> list[float]:
    """Refuses any sample whose label is not its own prompt's; scores even items by their
    lowercase fraction, odd ones by their fraction of letters (both learnable)."""
    out = []
    for prompt, response, item in zip(prompts, responses, label, strict=True):
        if f"item {item}." not in prompt:
            raise ValueError(f"the sample of {prompt!r} got the label {item!r}")
        chars = LOWER if int(item) % 2 == 0 else LETTERS
        out.append(sum(c in chars for c in response) / max(len(response), 1))
    return out


def length_term(prompts: list[str], responses: list[str], **columns: list) -> list[float]:
    """Response length in characters / 10; checks ``**columns`` got one value per response."""
    assert all(len(v) == len(responses) for v in columns.values()), columns
    return [len(r) / 10 for r in responses]


def slow_length(prompts: list[str], responses: list[str]) -> list[float]:
    """Each response's length, after 2 s: keeps a service's queue full for a while."""
    import time

    time.sleep(2.0)
    return [float(len(r)) for r in responses]
