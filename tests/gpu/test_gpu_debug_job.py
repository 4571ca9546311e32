"""GPU tier (only on a lent GPU machine: ``python -m pytest -m gpu``): the debug job with
every role colocated on one GPU through fractional GPUs."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO
from test_end_to_end import first_last, run_cli

from rlhf_ray.observe.metrics import read_metrics

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_debug_job_colocated_on_one_gpu(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(
        ["ppo", "--config", str(REPO / "jobs" / "debug_gpu.yaml"), "--run-dir", str(run_dir)],
        cwd=tmp_path,
    )
    rows = read_metrics(run_dir / "metrics.jsonl")
    first, last = first_last(rows, "rollout/reward_mean")
    wall = sum(r["time/round"] for r in rows)
    print(
        f"gpu debug job: {len(rows)} rounds, {wall:.1f}s in rounds, "
        f"reward {first:.3f} -> {last:.3f}"
    )
    assert len(rows) == 30 and last > first + 0.1
    assert "run dir:" in proc.stdout
