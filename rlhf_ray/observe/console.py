"""What a person reads on the console: a run's progress, and a summary when a command ends.

Progress: on a terminal, a live display (rich): a bar with rounds done and the ETA, the headline
figures of the last round (reward, KL) and its seconds per phase. Anywhere else (CI, a log file,
``ray job logs``) one plain line per round::

    round    3/8 | reward +0.1234 | kl +0.0012 | generate 0.31s score 0.12s ... | 1.02s | eta 5s

Every command ends with a ``Summary``: the headline figures, where each artifact is, and the
next command to run. ``print_summary`` is shared by every stage.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

PPO_HEADLINE = {"reward": "rollout/reward_mean", "kl": "ppo/kl"}


def _phases(row: dict[str, Any], step_key: str) -> dict[str, float]:
    """``time/<phase>`` seconds of a row, without the total."""
    total = f"time/{step_key}"
    return {
        k.removeprefix("time/"): v
        for k, v in row.items()
        if k.startswith("time/") and k != total and isinstance(v, (int, float))
    }


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_progress(
    row: dict[str, Any],
    total: int | None = None,
    eta_s: float | None = None,
    headline: dict[str, str] = PPO_HEADLINE,
    step_key: str = "round",
) -> str:
    """The plain one-line progress of a row (missing figures are left out)."""
    step = row.get(step_key, 0)
    parts = [f"{step_key} {step:>4}" + (f"/{total}" if total else "")]
    parts += [
        f"{label} {row[key]:+.4f}"
        for label, key in headline.items()
        if isinstance(row.get(key), (int, float))
    ]
    if "rollout/num_workers" in row:
        parts.append(f"workers {row['rollout/num_workers']}")
    phases = _phases(row, step_key)
    if phases:
        parts.append(" ".join(f"{name} {sec:.2f}s" for name, sec in phases.items()))
    if isinstance(row.get(f"time/{step_key}"), (int, float)):
        parts.append(f"{row[f'time/{step_key}']:.2f}s")
    if eta_s is not None:
        parts.append(f"eta {format_seconds(eta_s)}")
    return " | ".join(parts)


class ProgressDisplay:
    """Progress of a run of ``total`` steps (rounds), started at step ``start``.

    ``live=None`` picks the live display when ``stream`` is a terminal. ``console`` (a
    ``rich.console.Console``) is for tests that force a terminal.
    """

    def __init__(
        self,
        total: int,
        start: int = 0,
        headline: dict[str, str] = PPO_HEADLINE,
        step_key: str = "round",
        stream: TextIO | None = None,
        live: bool | None = None,
        console: Any = None,
        format_row: Callable[[dict[str, Any]], str] | None = None,
    ):
        self.format_row = format_row
        self.total, self.start, self.headline, self.step_key = total, start, headline, step_key
        self.stream = stream
        self.began = time.perf_counter()
        self.done = 0
        out = stream if stream is not None else sys.stdout
        # live only with a known total (a stage without one prints its plain lines)
        self.live = (
            live if live is not None else total > 0 and (console is not None or out.isatty())
        )
        self._live: Any = None
        self._bar: Any = None
        self._task: Any = None
        self._row: dict[str, Any] = {}
        if self.live:
            self._start_live(console)

    def eta_s(self, step: int) -> float | None:
        if self.done == 0:
            return None
        per_step = (time.perf_counter() - self.began) / self.done
        return per_step * max(0, self.total - step - 1)

    def update(self, row: dict[str, Any]) -> None:
        self.done += 1
        step = int(row.get(self.step_key, self.start + self.done - 1))
        if self._live is None:
            line = (
                self.format_row(row)
                if self.format_row
                else format_progress(
                    row, self.total, self.eta_s(step), self.headline, self.step_key
                )
            )
            print(line, file=self.stream, flush=True)
            return
        self._bar.update(self._task, completed=step + 1)
        self._row = row
        self._live.refresh()

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    # -- the live display ---------------------------------------------------------------------

    def _start_live(self, console: Any) -> None:
        from rich.console import Console, Group
        from rich.live import Live
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(
            TextColumn(f"[bold]{self.step_key}s"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("elapsed"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
        )
        self._task = self._bar.add_task("run", total=self.total, completed=self.start)
        display = self

        class _View:
            def __rich__(self) -> Any:
                return Group(display._bar, display._table())

        self._live = Live(
            _View(), console=console or Console(file=self.stream), refresh_per_second=4
        )
        self._live.start()

    def _table(self) -> Any:
        from rich.table import Table

        table = Table(box=None, show_header=True, header_style="bold", pad_edge=False)
        row = self._row
        figures = {
            label: row[key]
            for label, key in self.headline.items()
            if isinstance(row.get(key), (int, float))
        }
        phases = _phases(row, self.step_key)
        columns = [self.step_key, *figures, *(f"{p} s" for p in phases)]
        for name in columns:
            table.add_column(name, justify="right")
        if row:
            table.add_row(
                str(row.get(self.step_key, "")),
                *(f"{v:+.4f}" for v in figures.values()),
                *(f"{v:.2f}" for v in phases.values()),
            )
        return table


# ----------------------------------------------------------------------------------------------
# the summary at the end of a command


@dataclass
class Summary:
    """What a command ends with: headline figures, artifacts (name -> path) and what to run next."""

    title: str
    figures: dict[str, str] = field(default_factory=dict)
    artifacts: dict[str, Path | str] = field(default_factory=dict)
    next_commands: list[str] = field(default_factory=list)


def format_summary(summary: Summary) -> str:
    lines = [f"== {summary.title} =="]
    width = max((len(k) for k in summary.figures), default=0)
    lines += [f"  {name:<{width}}  {value}" for name, value in summary.figures.items()]
    lines += [f"{name}: {path}" for name, path in summary.artifacts.items()]
    lines += [f"next: {cmd}" for cmd in summary.next_commands]
    return "\n".join(lines)


def print_summary(summary: Summary, stream: TextIO | None = None) -> None:
    print(format_summary(summary), file=stream, flush=True)


def ppo_summary(run_dir: Path, rows: list[dict[str, Any]], seconds: float) -> Summary:
    """The end of ``rlhf-ray ppo``: reward first -> last, KL, sync check, where things are."""
    run_dir = run_dir.resolve()
    figures: dict[str, str] = {}
    if rows:
        first, last = rows[0], rows[-1]
        figures["rounds"] = f"{len(rows)} in {format_seconds(seconds)}"
        figures["reward (mean raw score)"] = (
            f"{first['rollout/reward_mean']:+.4f} (round {first['round']}) -> "
            f"{last['rollout/reward_mean']:+.4f} (round {last['round']})"
        )
        figures["kl to reference"] = f"{last['ppo/kl']:+.4f} (coef {last['ppo/kl_coef']:g})"
        diffs = [r["sync/logprob_max_abs_diff"] for r in rows if "sync/logprob_max_abs_diff" in r]
        if diffs:
            figures["sync check"] = f"max |logprob diff| {max(diffs):.2g}"
    artifacts: dict[str, Path | str] = {"run dir": run_dir}
    candidates = {
        "metrics": run_dir / "metrics.jsonl",
        "policy": run_dir / "policy",
        "value": run_dir / "value",
        "tensorboard": run_dir / "tb",
        "wandb": run_dir / "wandb",
    }
    artifacts.update({name: path for name, path in candidates.items() if path.exists()})
    checkpoints = sorted((run_dir / "checkpoints").glob("round_*"))
    if checkpoints:
        artifacts["checkpoints"] = f"{run_dir / 'checkpoints'} (newest {checkpoints[-1].name})"
    dumps = sorted((run_dir / "rollouts").glob("round_*.jsonl"))
    if dumps:
        artifacts["rollout dumps"] = f"{run_dir / 'rollouts'} ({len(dumps)} rounds)"
    next_commands = [f"rlhf-ray plot {run_dir}"]
    if dumps:
        next_commands.append(f"rlhf-ray replay {run_dir} --round {int(dumps[-1].stem[6:])}")
    if (run_dir / "policy").exists():
        next_commands.append(f"rlhf-ray generate --policy {run_dir / 'policy'}")
    return Summary("ppo finished", figures, artifacts, next_commands)


def stage_summary(command: str, run_dir: Path, output: Path, final: dict[str, float]) -> Summary:
    """The end of ``rlhf-ray sft`` / ``train-rm``: the last epoch's figures, where the model is,
    and how PPO uses it."""
    run_dir, output = run_dir.resolve(), output.resolve()
    figures = {key: f"{value:.4f}" for key, value in final.items() if isinstance(value, float)}
    artifacts: dict[str, Path | str] = {
        "run dir": run_dir,
        "metrics": run_dir / "metrics.jsonl",
        "model": output,
    }
    if (run_dir / "tb").exists():
        artifacts["tensorboard"] = run_dir / "tb"
    if (run_dir / "wandb").exists():
        artifacts["wandb"] = run_dir / "wandb"
    use = (
        f"rlhf-ray ppo --config PPO.yaml reward.function=null reward.model.path={output}"
        if command == "train-rm"
        else f"rlhf-ray ppo --config PPO.yaml policy.model.path={output} value.model.path={output}"
        f" tokenizer.kind=hf tokenizer.name_or_path={output}"
    )
    return Summary(f"{command} finished", figures, artifacts, [f"rlhf-ray plot {run_dir}", use])
