"""A verifiable task: sums A + B with A, B in 0..20, as prompt rows with a ``label`` column.

``builtin:arithmetic`` (220 problems, for training) and ``builtin:arithmetic-heldout`` (the
other 221) split the 441 problems by a fixed hash of the problem text, so the split is the same
on every machine and Python version, and disjoint. Rows come in that hashed order too, so the
first N of either split are a fair sample (eval takes the first ``eval.num_prompts``). Score
them with ``rlhf_ray.rewards:last_number_matches``.
"""

from __future__ import annotations

import hashlib

OPERANDS = range(21)
HELDOUT_SIZE = 221
PROMPT = "What is {a} + {b}? Give only the final number."


def _order(a: int, b: int) -> str:
    return hashlib.sha256(f"{a} + {b}".encode()).hexdigest()


def arithmetic_rows(heldout: bool = False) -> list[dict]:
    """The rows of the training split (or the held-out one): ``{"prompt", "label"}``, the
    label the sum as an int."""
    problems = sorted(((a, b) for a in OPERANDS for b in OPERANDS), key=lambda ab: _order(*ab))
    chosen = problems[:HELDOUT_SIZE] if heldout else problems[HELDOUT_SIZE:]
    return [{"prompt": PROMPT.format(a=a, b=b), "label": a + b} for a, b in chosen]
