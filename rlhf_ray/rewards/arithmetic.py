"""The verifiable reward of the arithmetic task (``builtin:arithmetic``, data/arithmetic.py)."""

from __future__ import annotations

import re

# A number as a reply writes it: an optional minus (not one between two digits, as in "3-5"),
# digits with optional thousands commas ("1,234"), an optional decimal part ("5.0"; a final
# "." is punctuation). "−" (U+2212) counts as a minus.
_NUMBER = re.compile(r"(?<![\d.])[-\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def last_number(text: str) -> float | None:
    """The last number written in ``text`` (None if there is none)."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    return float(found[-1].replace(",", "").replace("\u2212", "-"))


def last_number_matches(prompts: list[str], responses: list[str], label: list) -> list[float]:
    """1.0 when the last number in the response equals the prompt row's ``label`` (a number
    or a numeric string), else 0.0 (also when the response holds no number)."""
    out = []
    for response, answer in zip(responses, label, strict=True):
        got = last_number(response)
        out.append(float(got is not None and got == float(answer)))
    return out
