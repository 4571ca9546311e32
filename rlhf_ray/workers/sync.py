"""Streaming the policy's weights in buckets (``sync.bucket_mb``), shared by both runtimes.

One bucket is gathered (under ZeRO-3 a collective of every learner rank), sent and loaded at a
time, and the gather of bucket k+1 starts once bucket k is out, while the receivers load k. So
the sending rank holds at most about one bucket beyond its model and a receiver about one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Gather = Callable[[int], Callable[[], Any]]  # start gathering bucket k -> wait for it


def stream_buckets(count: int, start_gather: Gather, load: Callable[[Any, int], None]) -> None:
    """``load(bucket, k)`` for k = 0 .. count-1, overlapping gather k+1 with load k."""
    if count == 0:
        return
    pending = start_gather(0)
    for index in range(count):
        bucket = pending()
        if index + 1 < count:
            pending = start_gather(index + 1)
        load(bucket, index)
        del bucket
