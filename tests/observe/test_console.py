"""What a person reads: the progress line (and the live display on a terminal) and the summary."""

from __future__ import annotations

import io
import json
import re

from rich.console import Console

from rlhf_ray.observe.console import (
    ProgressDisplay,
    Summary,
    format_progress,
    format_seconds,
    format_summary,
    ppo_summary,
)

ROW = {
    "round": 3,
    "rollout/reward_mean": 0.25,
    "ppo/kl": -0.01,
    "ppo/kl_coef": 0.02,
    "rollout/num_workers": 2,
    "time/generate": 0.5,
    "time/update": 1.25,
    "time/round": 2.0,
}


def test_progress_line_has_rounds_reward_kl_phases_and_eta():
    line = format_progress(ROW, total=8, eta_s=125)
    assert line == (
        "round    3/8 | reward +0.2500 | kl -0.0100 | workers 2 "
        "| generate 0.50s update 1.25s | 2.00s | eta 2m05s"
    )
    # a stage row: its own step key and headline, missing figures left out
    stage = {"step": 12, "train/loss": 0.69, "time/step": 0.2}
    assert format_progress(stage, headline={"loss": "train/loss"}, step_key="step") == (
        "step   12 | loss +0.6900 | 0.20s"
    )


def test_plain_progress_prints_one_line_per_round_with_eta():
    out = io.StringIO()
    display = ProgressDisplay(total=5, stream=out)  # a StringIO is not a terminal
    assert not display.live
    for r in range(3):
        display.update({**ROW, "round": r})
    display.close()
    lines = out.getvalue().splitlines()
    assert [line.split(" |")[0] for line in lines] == [
        "round    0/5",
        "round    1/5",
        "round    2/5",
    ]
    assert all(re.search(r"\| eta \d+s$", line) for line in lines[1:])


def test_live_display_on_a_terminal_shows_rounds_reward_kl_and_phases():
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=120, color_system=None)
    display = ProgressDisplay(total=8, console=console)
    assert display.live
    display.update(ROW)
    display.close()
    screen = buffer.getvalue()
    assert "4/8" in screen  # rounds 0..3 done
    assert "reward" in screen and "+0.2500" in screen and "-0.0100" in screen
    assert "generate s" in screen and "1.25" in screen
    assert "round    3/8 |" not in screen  # not the plain line


def test_summary_lists_figures_artifacts_and_next_command(tmp_path):
    rows = [
        {**ROW, "round": 0, "rollout/reward_mean": 0.1, "sync/logprob_max_abs_diff": 0.0},
        {**ROW, "round": 1, "rollout/reward_mean": 0.4, "sync/logprob_max_abs_diff": 0.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "policy").mkdir()
    (tmp_path / "rollouts").mkdir()
    (tmp_path / "rollouts" / "round_000001.jsonl").write_text("")
    text = format_summary(ppo_summary(tmp_path, rows, seconds=75))
    assert "== ppo finished ==" in text
    assert "+0.1000 (round 0) -> +0.4000 (round 1)" in text
    assert "2 in 1m15s" in text and "max |logprob diff| 0" in text
    assert f"run dir: {tmp_path.resolve()}" in text
    assert f"policy: {tmp_path.resolve() / 'policy'}" in text
    assert f"next: rlhf-ray plot {tmp_path.resolve()}" in text
    assert f"next: rlhf-ray replay {tmp_path.resolve()} --round 1" in text
    assert "value:" not in text  # only artifacts that exist


def test_generic_summary_and_seconds():
    text = format_summary(Summary("sft finished", {"loss": "0.5"}, {"model": "/x"}, ["cmd"]))
    assert text.splitlines() == ["== sft finished ==", "  loss  0.5", "model: /x", "next: cmd"]
    assert [format_seconds(s) for s in (5, 65, 3725)] == ["5s", "1m05s", "1h02m"]
