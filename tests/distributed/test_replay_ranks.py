"""``rlhf-ray replay RUN --round 2`` of runs made on Ray with the default 2 policy ranks, under
ZeRO-2 and ZeRO-3: the learners are restored on their ranks in one process group on this
machine (rank 0 in the test's process) and the logged losses come back to 1e-6."""

from __future__ import annotations

import json

import pytest

from rlhf_ray.cli import main
from rlhf_ray.config.ppo import load_config
from rlhf_ray.distributed import RayWorkers
from rlhf_ray.observe.metrics import read_metrics
from rlhf_ray.ppo.loop import run_ppo

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SHORT = ["train.rounds=3", "checkpoint.every=1", "checkpoint.keep_last=10",
         "logging.dump_rollouts_every=1", "logging.progress=false", "rollout.batch_size=8",
         "ppo.minibatch_size=4", "rollout.max_new_tokens=8"]  # fmt: skip


@pytest.mark.parametrize("stage", [2, 3])
def test_replay_of_a_two_rank_zero_run_reproduces_the_logged_losses(
    stage, ray_cluster, tmp_path, capsys
):
    zero = [f"policy.zero_stage={stage}", f"value.zero_stage={stage}"]
    cfg = load_config(None, [*SHORT, *zero])
    assert cfg.policy.num_ranks == 2  # the default
    run_dir = tmp_path / "run"
    workers = RayWorkers(cfg)
    try:
        run_ppo(cfg, workers, run_dir)
    finally:
        workers.close()
    capsys.readouterr()
    assert main(["replay", str(run_dir), "--round", "2", "--json"]) == 0  # every figure agrees
    replayed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    logged = read_metrics(run_dir / "metrics.jsonl")[2]
    for key in ("ppo/policy_loss", "ppo/value_loss"):
        assert abs(replayed[key] - logged[key]) <= 1e-6, key
