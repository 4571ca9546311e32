"""Per-round metrics: the JSONL sink (always), TensorBoard and W&B sinks (optional extras),
the progress display, named phase timers."""

from __future__ import annotations

import importlib.util
import json
import math
import netrc
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from rlhf_ray.errors import UserError
from rlhf_ray.observe.console import PPO_HEADLINE, ProgressDisplay, format_progress

__all__ = ["MetricsLog", "PhaseTimer", "format_progress", "open_metrics_log", "read_metrics"]


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


class TensorBoardSink:
    """Scalars under ``directory`` (the ``tensorboard`` extra)."""

    def __init__(self, directory: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError(_missing("logging.tensorboard", "tensorboard")) from None
        self.writer = SummaryWriter(str(directory))

    def log(self, row: dict[str, Any], step: int) -> None:
        for k, v in _scalars(row).items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A Weights & Biases run (the ``wandb`` extra), offline unless it can reach its server."""

    def __init__(
        self,
        project: str,
        directory: Path,
        name: str,
        mode: Any,
        config: dict[str, Any] | None = None,
    ):
        try:
            import wandb
        except ImportError:
            raise UserError(_missing("logging.wandb", "wandb")) from None
        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=project,
            dir=str(directory),
            name=name,
            mode=mode,
            config=config,
            settings=wandb.Settings(console="off", silent=True),
        )
        self.mode = mode

    def log(self, row: dict[str, Any], step: int) -> None:
        self.run.log(_scalars(row), step=step)

    def close(self) -> None:
        self.run.finish()


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in row.items()
        if isinstance(v, (int, float))
        and not isinstance(v, bool)
        and k not in ("round", "step")
        and math.isfinite(v)
    }


def _missing(setting: str, package: str) -> str:
    return (
        f"{setting} is on but the `{package}` package is not installed: "
        f"pip install 'rlhf-ray[{package}]' (or set {setting}=false)"
    )


def check_sinks(logging_cfg) -> None:
    """Refuse, before anything starts, a sink that is switched on but not installed."""
    for setting, on, package in (
        ("logging.tensorboard", logging_cfg.tensorboard, "tensorboard"),
        ("logging.wandb", logging_cfg.wandb, "wandb"),
    ):
        if on and importlib.util.find_spec(package) is None:
            raise UserError(_missing(setting, package))


def _wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode(setting: str) -> str:
    """``auto``: ``$WANDB_MODE`` if set, else online only with credentials and a reachable
    server (a 2 s probe), else offline."""
    if setting != "auto":
        return setting
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if _wandb_credentials():
        try:
            socket.create_connection(("api.wandb.ai", 443), timeout=2).close()
            return "online"
        except OSError:
            pass
    return "offline"


class MetricsLog:
    """Appends one JSON object per round (or step) to ``metrics.jsonl``, forwards it to the
    optional TensorBoard and W&B sinks, and shows progress.

    ``progress``: a ``ProgressDisplay``, or True for a plain line per row (on ``stream``)."""

    def __init__(
        self,
        path: Path,
        progress: bool | ProgressDisplay = True,
        stream: TextIO | None = None,
        tensorboard_dir: Path | None = None,
        wandb: WandbSink | None = None,
        format_row: Callable[[dict[str, Any]], str] | None = None,
        step_key: str = "round",
    ):
        """``format_row``: the plain progress line of a row (default: PPO's); ``step_key``: the
        row field that is the sinks' step."""
        self.path = path
        self.step_key = step_key
        self.sinks: list[TensorBoardSink | WandbSink] = []
        if tensorboard_dir is not None:
            self.sinks.append(TensorBoardSink(tensorboard_dir))
        if wandb is not None:
            self.sinks.append(wandb)
        if progress is True:
            progress = ProgressDisplay(
                0, stream=stream, live=False, step_key=step_key, format_row=format_row
            )
        self.display = progress or None

    def write(self, row: dict[str, Any], show: bool = True) -> None:
        """Append ``row`` and send it to the sinks; show its progress if ``show``."""
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in row.items()
        }
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        step = int(row.get(self.step_key, 0))
        for sink in self.sinks:
            sink.log(row, step)
        if self.display is not None and show:
            self.display.update(row)

    def close(self) -> None:
        if self.display is not None:
            self.display.close()
        for sink in self.sinks:
            sink.close()


def open_metrics_log(
    run_dir: Path,
    logging_cfg,
    total: int,
    start: int = 0,
    config: dict[str, Any] | None = None,
    headline: dict[str, str] = PPO_HEADLINE,
    step_key: str = "round",
    format_row: Callable[[dict[str, Any]], str] | None = None,
) -> MetricsLog:
    """The metrics log of a run (any stage) as ``logging_cfg`` asks: ``RUN/metrics.jsonl``,
    TensorBoard under ``RUN/tb``, W&B under ``logging.wandb_dir`` (default ``RUN/wandb``), and
    progress of ``total`` steps (live on a terminal)."""
    wandb = None
    if logging_cfg.wandb:
        wandb = WandbSink(
            logging_cfg.wandb_project,
            Path(logging_cfg.wandb_dir) if logging_cfg.wandb_dir else run_dir,
            run_dir.resolve().name,
            resolve_wandb_mode(logging_cfg.wandb_mode),
            config,
        )
    progress = logging_cfg.progress and ProgressDisplay(
        total, start, headline, step_key, format_row=format_row
    )
    return MetricsLog(
        run_dir / "metrics.jsonl",
        progress,
        tensorboard_dir=run_dir / "tb" if logging_cfg.tensorboard else None,
        wandb=wandb,
        step_key=step_key,
    )


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl``; a partly written last line (a run still going) is
    skipped, a broken line elsewhere is an error."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1} is not a JSON object") from None
    return rows
