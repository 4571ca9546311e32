"""Per-round metrics: a JSONL sink, a one-line progress display, named phase timers."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO


class PhaseTimer:
    """``with timer.phase("generate"):`` records ``time/generate`` in seconds."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[f"time/{name}"] = time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        out, self.seconds = self.seconds, {}
        return out


class MetricsLog:
    """Appends one JSON object per round to ``metrics.jsonl`` and prints a progress line."""

    def __init__(
        self,
        path: Path,
        progress: bool = True,
        stream: TextIO | None = None,
        tensorboard_dir: Path | None = None,
        format_row: Callable[[dict[str, Any]], str] | None = None,
        step_key: str = "round",
    ):
        """``format_row``: the progress line of a row (default: PPO's); ``step_key``: the row
        field that is the TensorBoard step."""
        self.path = path
        self.progress = progress
        self.stream = stream
        self.format_row = format_row or format_progress
        self.step_key = step_key
        self.tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                self.tb = None
            else:
                self.tb = SummaryWriter(str(tensorboard_dir))

    def write(self, row: dict[str, Any], show: bool = True) -> None:
        """Append ``row``; print its progress line if ``progress`` and ``show``."""
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in row.items()
        }
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != self.step_key:
                    self.tb.add_scalar(k, v, row[self.step_key])
            self.tb.flush()
        if self.progress and show:
            print(self.format_row(row), file=self.stream, flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def format_progress(row: dict[str, Any]) -> str:
    return (
        f"round {row['round']:>4} | reward {row['rollout/reward_mean']:+.4f} "
        f"| kl {row['ppo/kl']:+.4f} | workers {row.get('rollout/num_workers', '-')} "
        f"| {row['time/round']:.1f}s"
    )


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
