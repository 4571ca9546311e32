"""Metric sinks: JSONL always, TensorBoard and W&B when switched on (installed in CI via the
``dev`` extra), a clear refusal when a sink's package is missing; reading a run still going."""

from __future__ import annotations

import io
import json
import sys

import pytest

from rlhf_ray.cli import main
from rlhf_ray.config.ppo import LoggingConfig
from rlhf_ray.errors import UserError
from rlhf_ray.observe.metrics import MetricsLog, check_sinks, read_metrics, resolve_wandb_mode


def test_read_metrics_skips_a_half_written_last_line_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 0}\n{"round": 1}\n{"round": 2, "ppo/k')
    assert read_metrics(path) == [{"round": 0}, {"round": 1}]
    path.write_text('{"round": 0}\n{"rou\n{"round": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_metrics(path)


def test_jsonl_rows_and_progress_with_a_stage_format(tmp_path):
    out = io.StringIO()
    log = MetricsLog(tmp_path / "m.jsonl", True, stream=out, step_key="step",
                     format_row=lambda row: f"step {row['step']}")  # fmt: skip
    log.write({"step": 1, "train/loss": float("nan")})
    log.write({"step": 2, "train/loss": 0.5}, show=False)
    log.close()
    assert read_metrics(tmp_path / "m.jsonl") == [
        {"step": 1, "train/loss": None},
        {"step": 2, "train/loss": 0.5},
    ]
    assert out.getvalue() == "step 1\n"


@pytest.mark.parametrize("setting, package", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_a_sink_switched_on_without_its_package_stops_the_run_first(
    monkeypatch, capsys, setting, package
):
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed
    with pytest.raises(UserError, match=rf"pip install 'rlhf-ray\[{package}\]'"):
        check_sinks(LoggingConfig(**{setting: True}))
    check_sinks(LoggingConfig())  # nothing switched on: nothing needed
    # the CLI refuses before starting Ray (no --in-process: a Ray start would take seconds)
    assert main(["ppo", f"logging.{setting}=true"]) == 2
    err = capsys.readouterr().err
    assert f"logging.{setting} is on but the `{package}` package is not installed" in err


def test_wandb_mode_is_offline_without_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_wandb_mode("auto") == "offline"
    assert resolve_wandb_mode("online") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("auto") == "disabled"


def test_tensorboard_events_are_written(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(tmp_path / "m.jsonl", False, tensorboard_dir=tmp_path / "tb")
    for r in range(3):
        log.write({"round": r, "rollout/reward_mean": 0.1 * r, "ppo/kl": float("inf")})
    log.close()
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert "ppo/kl" not in events.Tags()["scalars"]  # non-finite values are not sent
    reward = events.Scalars("rollout/reward_mean")
    assert [(e.step, round(e.value, 6)) for e in reward] == [(0, 0.0), (1, 0.1), (2, 0.2)]
    assert json.loads((tmp_path / "m.jsonl").read_text().splitlines()[0])["ppo/kl"] is None
