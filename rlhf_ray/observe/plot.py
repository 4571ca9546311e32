"""``rlhf-ray plot RUN [RUN_B ...]``: PNG curves of a run's ``metrics.jsonl`` (matplotlib, the
``plot`` extra).

The kind of run is read from its metric keys: PPO rows have ``rollout/*`` and ``ppo/*`` keys
(x axis: round); ``sft`` and ``train-rm`` rows have a ``step`` and ``train/*`` keys, a reward
model's with an ``accuracy`` (x axis: optimizer step; evaluations and epoch ends are marked).
A run that is still writing can be plotted (a half-written last line is skipped). With several
runs every panel overlays them: one colour per run, one line style per series.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_ray.errors import UserError
from rlhf_ray.observe.metrics import read_metrics

Rows = list[dict[str, Any]]


@dataclass
class Run:
    label: str
    rows: Rows


@dataclass
class Chart:
    """One axes: ``series`` (key, label) against the x key, on a labelled y axis."""

    title: str
    ylabel: str
    series: list[tuple[str, str]]
    band: dict[str, str] = field(default_factory=dict)  # mean key -> std key (± band)
    twin: tuple[str, str, str] | None = None  # (key, label, ylabel) on a right-hand axis
    stacked: bool = False  # a stacked area per series (one run only)
    hlines: tuple[float, ...] = ()


# PPO: one PNG per entry, each holding one or two charts; overview.png holds them all.
PPO_FIGURES: dict[str, list[Chart]] = {
    "reward": [
        Chart(
            "Reward: mean raw score ± std, and the shaped score",
            "score",
            [
                ("rollout/reward_mean", "reward mean"),
                ("rollout/score_mean", "shaped score (PPO's reward)"),
            ],
            band={"rollout/reward_mean": "rollout/reward_std"},
        )
    ],
    "kl": [
        Chart(
            "KL to the reference",
            "KL (nats / sequence)",
            [("ppo/kl", "KL")],
            twin=("ppo/kl_coef", "KL coefficient β", "β"),
        )
    ],
    "entropy": [Chart("Policy entropy", "nats / token", [("ppo/entropy", "entropy")])],
    "losses": [
        Chart("Policy loss", "loss", [("ppo/policy_loss", "policy loss")], hlines=(0,)),
        Chart("Value loss", "loss", [("ppo/value_loss", "value loss")]),
    ],
    "clipping": [
        Chart(
            "Clip fraction",
            "fraction of tokens",
            [("ppo/clipfrac", "policy ratio clipped"), ("ppo/vf_clipfrac", "value clipped")],
        ),
        Chart(
            "Approximate KL (old -> new policy)", "nats / token", [("ppo/approx_kl", "approx KL")]
        ),
    ],
    "explained_variance": [
        Chart(
            "Explained variance of the critic",
            "1 - Var(R - V) / Var(R)",
            [("ppo/explained_variance", "explained variance")],
            hlines=(0, 1),
        )
    ],
    "responses": [
        Chart("Response length", "tokens", [("rollout/response_length", "length")]),
        Chart("EOS rate", "fraction of responses", [("rollout/eos_rate", "EOS rate")], hlines=(1,)),
    ],
    "time": [
        Chart("Seconds per phase (stacked)", "seconds / round", [], stacked=True),
        Chart("Generation throughput", "new tokens / s", [("rollout/tokens_per_s", "tokens/s")]),
    ],
}

STAGE_PREFIXES = (
    ("train/", "train (per step)"),
    ("eval/", "eval"),
    ("epoch/train_", "train (epoch end)"),
)
STAGE_YLABELS = {
    "loss": "loss",
    "accuracy": "accuracy (chosen > rejected)",
    "margin": "score margin (chosen - rejected)",
}


def run_kind(rows: Rows) -> str:
    """``ppo``, ``train-rm`` or ``sft``, from the keys the rows hold."""
    keys = {k for row in rows for k in row}
    if any(k.startswith(("ppo/", "rollout/")) for k in keys):
        return "ppo"
    if "step" in keys and any(k.startswith(p) for k in keys for p, _ in STAGE_PREFIXES):
        return "train-rm" if any(k.endswith("accuracy") for k in keys) else "sft"
    raise UserError(
        "cannot tell what kind of run wrote these metrics (no ppo/, rollout/ or step + train/ keys)"
    )


def load_run(run_dir: Path) -> Run:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise UserError(f"{run_dir} has no metrics.jsonl (is it a run dir?)")
    rows = read_metrics(path)
    if not rows:
        raise UserError(f"{path} has no complete row yet")
    return Run(run_dir.resolve().name, rows)


def stage_charts(rows: Rows) -> dict[str, list[Chart]]:
    """One figure per metric a stage reports under ``train/`` (loss first, then accuracy ...)."""
    names: list[str] = []
    for row in rows:
        for key in row:
            if key.startswith("train/") and key[6:] not in names:
                names.append(key[6:])
    names.sort(key=lambda n: (n != "loss", n != "accuracy", n))
    return {
        name: [
            Chart(
                name.replace("_", " ").capitalize(),
                STAGE_YLABELS.get(name, name),
                [(prefix + name, label) for prefix, label in STAGE_PREFIXES],
            )
        ]
        for name in names
    }


def _xy(rows: Rows, x_key: str, key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and x_key in row:
            xs.append(row[x_key])
            ys.append(float(value))
        elif key in row and value is None and x_key in row:  # non-finite, written as null
            xs.append(row[x_key])
            ys.append(math.nan)
    return xs, ys


STYLES = ("-", "--", ":", "-.")
SMOOTH_FROM = 25  # points from which a series is drawn with a moving average over it


def moving_average(ys: list[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` points (NaNs skipped)."""
    out = []
    for i in range(len(ys)):
        part = [y for y in ys[max(0, i - window + 1) : i + 1] if not math.isnan(y)]
        out.append(sum(part) / len(part) if part else math.nan)
    return out


def draw_chart(ax: Any, chart: Chart, runs: list[Run], x_key: str) -> None:
    overlay = len(runs) > 1
    if chart.stacked:
        _draw_phases(ax, runs, x_key)
    for r, run in enumerate(runs):
        for s, (key, label) in enumerate(chart.series):
            xs, ys = _xy(run.rows, x_key, key)
            if not xs:
                continue
            color = f"C{r}" if overlay else f"C{s}"
            sparse = len(xs) < 30 or not key.startswith(("train/", "ppo/", "rollout/"))
            name = f"{run.label}: {label}" if overlay else label
            style = {"color": color, "linestyle": STYLES[s % 4], "linewidth": 2.0 - 0.4 * s}
            if len(xs) >= SMOOTH_FROM:  # noisy per-step curves: faint raw, bold moving average
                window = max(3, len(xs) // 15)
                ax.plot(xs, ys, color=color, linewidth=0.8, alpha=0.3)
                ax.plot(xs, moving_average(ys, window), label=f"{name} (mean of {window})", **style)
            else:
                ax.plot(xs, ys, label=name, marker="o" if sparse else None, markersize=3, **style)
            std_key = chart.band.get(key)
            if std_key:
                _, stds = _xy(run.rows, x_key, std_key)
                if len(stds) == len(ys):
                    ax.fill_between(
                        xs,
                        [y - d for y, d in zip(ys, stds, strict=True)],
                        [y + d for y, d in zip(ys, stds, strict=True)],
                        color=color,
                        alpha=0.15,
                        label=f"{name} ± std",
                    )
    for y in chart.hlines:
        ax.axhline(y, color="grey", linewidth=0.6, linestyle=":")
    if chart.twin:
        _draw_twin(ax, chart.twin, runs, x_key)
    ax.set_title(chart.title, fontsize=10)
    ax.set_xlabel(x_key)
    ax.set_ylabel(chart.ylabel)
    ax.grid(True, alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(
            0.5,
            0.5,
            "not logged by this run",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="grey",
        )


def _draw_twin(ax: Any, twin: tuple[str, str, str], runs: list[Run], x_key: str) -> None:
    key, label, ylabel = twin
    right = ax.twinx()
    for r, run in enumerate(runs):
        xs, ys = _xy(run.rows, x_key, key)
        if xs:
            color = f"C{r}" if len(runs) > 1 else "C3"
            name = f"{run.label}: {label}" if len(runs) > 1 else label
            right.plot(xs, ys, ":", color=color, label=name, linewidth=1.2)
    right.set_ylabel(ylabel)
    right.set_ylim(bottom=0)
    handles, _ = right.get_legend_handles_labels()
    if handles:
        right.legend(fontsize=7, loc="lower right")


def _draw_phases(ax: Any, runs: list[Run], x_key: str) -> None:
    """Seconds per phase: stacked areas for one run; a line per phase and run for several."""
    total = f"time/{x_key}"
    phases: list[str] = []
    for run in runs:
        for row in run.rows:
            phases += [k for k in row if k.startswith("time/") and k != total and k not in phases]
    if len(runs) == 1:
        rows = [row for row in runs[0].rows if x_key in row]
        xs = [row[x_key] for row in rows]
        stack = [[float(row.get(p) or 0.0) for row in rows] for p in phases]
        if xs:
            ax.stackplot(xs, stack, labels=[p.removeprefix("time/") for p in phases], alpha=0.8)
        return
    for r, run in enumerate(runs):
        for s, phase in enumerate(phases):
            xs, ys = _xy(run.rows, x_key, phase)
            ax.plot(
                xs,
                ys,
                STYLES[s % 4],
                color=f"C{r}",
                label=f"{run.label}: {phase.removeprefix('time/')}",
            )


def _save(path: Path, charts: list[Chart], runs: list[Run], x_key: str, cols: int) -> Path:
    import matplotlib.pyplot as plt

    rows = math.ceil(len(charts) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 3.8 * rows), squeeze=False)
    for ax, chart in zip(axes.flat, charts, strict=False):
        draw_chart(ax, chart, runs, x_key)
    for ax in list(axes.flat)[len(charts) :]:
        ax.set_visible(False)
    fig.suptitle(" vs ".join(run.label for run in runs), fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_runs(run_dirs: list[Path], out_dir: Path | None = None) -> list[Path]:
    """Write the PNGs of one run (into ``RUN/plots``) or an overlay of several (into the first
    run's ``plots/overlay``); returns the files written."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("plots need matplotlib: pip install 'rlhf-ray[plot]'") from None
    matplotlib.use("Agg")
    runs = [load_run(d) for d in run_dirs]
    kinds = {run_kind(run.rows) for run in runs}
    if len(kinds) > 1:
        raise UserError(f"cannot overlay runs of different kinds: {sorted(kinds)}")
    kind = kinds.pop()
    if len({run.label for run in runs}) < len(runs):  # same names: tell them apart by parent
        for run, d in zip(runs, run_dirs, strict=True):
            run.label = f"{d.resolve().parent.name}/{run.label}"
    out = out_dir or run_dirs[0] / "plots" / ("overlay" if len(runs) > 1 else "")
    out.mkdir(parents=True, exist_ok=True)
    x_key = "round" if kind == "ppo" else "step"
    figures = PPO_FIGURES if kind == "ppo" else stage_charts([r for run in runs for r in run.rows])
    written = [
        _save(out / f"{name}.png", charts, runs, x_key, cols=len(charts))
        for name, charts in figures.items()
    ]
    every: list[Chart] = [c for charts in figures.values() for c in charts]
    if len(every) > 1:
        written.append(_save(out / "overview.png", every, runs, x_key, cols=3))
    return written
