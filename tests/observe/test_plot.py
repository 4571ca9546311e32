"""``rlhf-ray plot``: the PNGs of PPO, reward-model and SFT runs, of a run still being written,
and overlays of several runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image
import pytest

from rlhf_ray.cli import main
from rlhf_ray.errors import UserError
from rlhf_ray.observe.plot import PPO_FIGURES, run_kind


def _write(run: Path, rows: list[dict], tail: str = "") -> Path:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return run


def ppo_rows(n: int, slope: float = 0.02) -> list[dict]:
    return [
        {
            "round": r,
            "rollout/reward_mean": 0.1 + slope * r,
            "rollout/reward_std": 0.05,
            "rollout/score_mean": 0.1 + slope * r,
            "rollout/response_length": 16 - r * 0.2,
            "rollout/eos_rate": min(1.0, 0.1 * r),
            "rollout/tokens_per_s": 500 + r,
            "ppo/kl": 0.3 * r,
            "ppo/kl_coef": 0.02,
            "ppo/entropy": 5 - 0.1 * r,
            "ppo/policy_loss": -0.01 * math.sin(r),
            "ppo/value_loss": 1 / (r + 1),
            "ppo/clipfrac": 0.1,
            "ppo/approx_kl": 0.001 * r,
            "ppo/explained_variance": None if r == 0 else 1 - 1 / (r + 1),
            "time/generate": 0.3,
            "time/score": 0.1,
            "time/advantage": 0.01,
            "time/update": 0.6,
            "time/sync": 0.05,
            "time/round": 1.06,
        }
        for r in range(n)
    ]


def stage_rows(steps: int, accuracy: bool) -> list[dict]:
    rows = []
    for s in range(1, steps + 1):
        row = {"step": s, "epoch": 0, "train/loss": 0.7 - 0.01 * s, "time/step": 0.2}
        if accuracy:
            row["train/accuracy"] = 0.5 + 0.01 * s
        rows.append(row)
        if s % 5 == 0:  # a mid-epoch evaluation row
            rows.append({"step": s, "epoch": 0, "eval/loss": 0.7 - 0.008 * s,
                         **({"eval/accuracy": 0.5 + 0.008 * s} if accuracy else {})})  # fmt: skip
    return rows


def _is_png(path: Path) -> bool:
    image = matplotlib.image.imread(path)
    return image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300


def test_ppo_run_still_being_written_gets_every_figure(tmp_path):
    run = _write(tmp_path / "ppo-a", ppo_rows(12), tail='{"round": 12, "rollout/rew')
    assert main(["plot", str(run)]) == 0
    names = sorted(p.name for p in (run / "plots").glob("*.png"))
    assert names == sorted([f"{name}.png" for name in PPO_FIGURES] + ["overview.png"])
    assert all(_is_png(p) for p in (run / "plots").glob("*.png"))


def test_overlay_of_two_ppo_runs(tmp_path, capsys):
    a = _write(tmp_path / "a", ppo_rows(10))
    b = _write(tmp_path / "b", ppo_rows(6, slope=0.05))
    assert main(["plot", str(a), str(b)]) == 0
    assert _is_png(a / "plots" / "overlay" / "reward.png")
    assert f"plots: {(a / 'plots' / 'overlay').resolve()}" in capsys.readouterr().out


def test_reward_model_and_sft_runs(tmp_path):
    rm = _write(tmp_path / "rm", stage_rows(20, accuracy=True))
    sft = _write(tmp_path / "sft", stage_rows(20, accuracy=False))
    assert run_kind(stage_rows(3, True)) == "train-rm" and run_kind(stage_rows(3, False)) == "sft"
    assert main(["plot", str(rm)]) == 0 and main(["plot", str(sft)]) == 0
    assert sorted(p.name for p in (rm / "plots").glob("*.png")) == [
        "accuracy.png",
        "loss.png",
        "overview.png",
    ]
    assert [p.name for p in (sft / "plots").glob("*.png")] == ["loss.png"]


def test_plot_refuses_what_it_cannot_draw(tmp_path):
    with pytest.raises(UserError, match="no metrics.jsonl"):
        from rlhf_ray.observe.plot import plot_runs

        plot_runs([tmp_path])
    a = _write(tmp_path / "a", ppo_rows(3))
    b = _write(tmp_path / "b", stage_rows(3, accuracy=True))
    assert main(["plot", str(a), str(b)]) == 2
