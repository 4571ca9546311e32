"""Length control: a built-in ``reward.terms`` function against length bias.

Reward models learned from human preferences tend to score longer answers higher, and PPO
exploits it (Singhal et al. 2023, "A Long Way to Go: Investigating Length Correlations in
RLHF"). ``length_penalty`` charges each response for its length beyond a target, linearly,
so the term's weight reads as the price of one unit past the target::

    terms:
      - {name: length, weight: 0.05, function: "rlhf_ray.rewards:length_penalty",
         kwargs: {target: 40, unit: words}}

A reward function sees text, not the policy's tokens, so length is counted in ``words``
(whitespace-separated, the default), ``chars`` (characters: a byte-level tokenizer's tokens
for ASCII text) or ``bytes`` (UTF-8 bytes: exactly the built-in byte tokenizer's tokens).
"""

from __future__ import annotations

LENGTH_UNITS = ("words", "chars", "bytes")


def response_length(text: str, unit: str) -> int:
    """The length of ``text`` in ``unit`` (``LENGTH_UNITS``)."""
    if unit == "words":
        return len(text.split())
    if unit == "chars":
        return len(text)
    if unit == "bytes":
        return len(text.encode("utf-8"))
    raise ValueError(f"length unit {unit!r} is not one of {LENGTH_UNITS}")


def length_penalty(
    prompts: list[str],
    responses: list[str],
    target: int = 64,
    unit: str = "words",
    normalize: bool = False,
) -> list[float]:
    """``-max(0, length - target)`` per response: 0 up to ``target`` units, then -1 per unit
    beyond it; with ``normalize``, divided by ``target`` (-1 at twice the target). Used as a
    term with a positive weight, that weight is the cost of one unit (or one target length)
    past the target."""
    if target <= 0:
        raise ValueError(f"length_penalty: target must be positive, got {target}")
    out = []
    for response in responses:
        excess = max(0, response_length(response, unit) - target)
        out.append(-(excess / target if normalize else float(excess)))
    return out
