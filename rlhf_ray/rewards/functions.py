"""Built-in rule-based rewards and the loader for ``reward.function``.

A reward function is any callable ``fn(prompts: list[str], responses: list[str]) ->
list[float]``, named as ``"package.module:callable"``. Further parameters named after columns
of the prompt set (``fn(prompts, responses, label)``), or ``**columns``, receive those columns
as lists aligned with ``responses`` (each sample gets its own prompt row's value); a parameter
with a default may be absent from the data.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
import string
import sys
from collections.abc import Callable, Sequence
from typing import Any

RewardFn = Callable[..., Sequence[float]]

_LOWERCASE = set(string.ascii_lowercase + " ")


def lowercase_fraction(prompts: list[str], responses: list[str]) -> list[float]:
    """Fraction of a response's characters that are lowercase ASCII letters or spaces.

    The default run's reward: a randomly initialised byte-level policy starts near 0.1 and PPO
    visibly raises it within a few rounds, so a first run shows learning without any download.
    """
    return [sum(c in _LOWERCASE for c in r) / max(len(r), 1) for r in responses]


_WORD = re.compile(r"[a-z0-9']+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _overlap(response: set[str], reference: list[str]) -> float:
    """Fraction of the reference's distinct words that the response uses (0 for no words)."""
    ref = set(reference)
    return len(response & ref) / len(ref) if ref else 0.0


def preference_overlap(
    prompts: list[str], responses: list[str], chosen: list[str], rejected: list[str]
) -> list[float]:
    """A lexical preference reward for HH-RLHF prompts (the ShrayGPT RLHF notebook's):
    ``overlap(response, chosen) - overlap(response, rejected) - 0.2 * length_penalty``, where
    ``overlap(r, x)`` is the fraction of x's distinct lowercase words that r uses and the
    length penalty is ``|words(r) - words(chosen)| / max(words(chosen), 1)``. A quick baseline
    beside a learned reward model; needs the ``chosen``/``rejected`` replies of HH rows."""
    out = []
    for response, good, bad in zip(responses, chosen, rejected, strict=True):
        words, good_words = _words(response), _words(good)
        have = set(words)
        penalty = abs(len(words) - len(good_words)) / max(len(good_words), 1)
        out.append(_overlap(have, good_words) - _overlap(have, _words(bad)) - 0.2 * penalty)
    return out


def column_parameters(fn: Callable[..., Any]) -> tuple[list[str], list[str], bool]:
    """``(required, optional, takes_all)``: the column parameters of a reward function beyond
    ``(prompts, responses)`` (those without and with defaults) and whether it takes
    ``**columns``. A callable without a signature takes none."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return [], [], False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    named = [p for p in params if p.kind in (*positional, inspect.Parameter.KEYWORD_ONLY)][2:]
    required = [p.name for p in named if p.default is inspect.Parameter.empty]
    optional = [p.name for p in named if p.default is not inspect.Parameter.empty]
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    return required, optional, takes_all


def missing_columns(fn: Callable[..., Any], column_names: Sequence[str]) -> list[str]:
    """The columns ``fn`` requires that the prompt set does not have."""
    return [c for c in column_parameters(fn)[0] if c not in column_names]


def column_arguments(
    fn: Callable[..., Any], columns: Sequence[dict[str, Any]]
) -> dict[str, list[Any]]:
    """The keyword arguments ``fn`` gets: each column it declares (all, with ``**columns``) as
    a list with one value per row of ``columns``."""
    required, optional, takes_all = column_parameters(fn)
    present = {name for row in columns for name in row}
    names = sorted(present) if takes_all else [*required, *(c for c in optional if c in present)]
    return {name: [row.get(name) for row in columns] for name in names}


def load_reward_function(name: str, search_path: Sequence[str] = ()) -> RewardFn:
    """Import ``"package.module:callable"``; ``search_path`` entries are tried first."""
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ValueError(f"reward.function {name!r} must look like 'package.module:callable'")
    for entry in reversed(list(search_path)):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"reward.function {name!r}: cannot import {module_name!r} ({exc})"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward.function {name!r}: {module_name} has no callable {attr!r}")
    return fn


def call_reward_function(
    fn: RewardFn,
    name: str,
    prompts: list[str],
    responses: list[str],
    columns: Sequence[dict[str, Any]] | None = None,
) -> list[float]:
    """Call ``fn`` (with the columns it declares, from ``columns``: one dict per response) and
    check it returned one finite number per response."""
    kwargs = column_arguments(fn, columns) if columns is not None else {}
    scores = [float(s) for s in fn(prompts, responses, **kwargs)]
    if len(scores) != len(responses):
        raise ValueError(
            f"reward.function {name!r} returned {len(scores)} scores for {len(responses)} responses"
        )
    bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
    if bad:
        raise ValueError(f"reward.function {name!r} returned non-finite scores at rows {bad[:5]}")
    return scores
