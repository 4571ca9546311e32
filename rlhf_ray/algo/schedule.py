"""Learning-rate schedule: linear warmup, then constant, linear or cosine decay.

``lr_multiplier(step, ...)`` is the factor applied to the peak learning rate for the update
numbered ``step`` (0 for the first optimizer step). Warmup rises linearly to 1 over
``warmup`` steps, starting at ``1 / warmup`` (never 0: every update moves the weights). The
decay then runs over the remaining ``total - warmup`` steps and reaches ``min_ratio`` at the
last step ``total - 1``; steps beyond ``total`` stay at ``min_ratio``.
"""

from __future__ import annotations

import math


def lr_multiplier(step: int, warmup: int, total: int, kind: str, min_ratio: float = 0.0) -> float:
    """Factor of the peak LR at optimizer step ``step`` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    span = total - warmup - 1
    progress = 1.0 if span <= 0 else min(1.0, (step - warmup) / span)
    if kind == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    if kind == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {kind!r}")
