"""The bearer token of ``reward.remote.token_env`` reaches the reward actors of a Ray run
although the cluster was started before the variable was set (as on a remote cluster, where the
driver's environment never reaches the actors), and is written nowhere: not in the run dir
(config.yaml, metrics, dumps, checkpoints), not in Ray's session logs, not on the console."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf_ray.config.ppo import load_config
from rlhf_ray.distributed import RayWorkers
from rlhf_ray.observe.metrics import read_metrics
from rlhf_ray.ppo.loop import run_ppo
from tests.helpers.reward_servers import RewardServer

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SECRET = "tok-7f3c9e1a-never-written"


def _files_holding(root: Path, needle: bytes) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            try:
                if needle in path.read_bytes():
                    found.append(str(path))
            except OSError:
                continue
    return found


def test_the_token_reaches_the_actors_and_is_written_nowhere(
    ray_cluster, tmp_path, monkeypatch, capfd
):
    server = RewardServer(token=SECRET)
    monkeypatch.setenv("RR_SECRET", SECRET)  # after the cluster started: actors lack it
    overrides = [
        "policy.engine=torch",
        "policy.num_ranks=1",
        "value.engine=torch",
        "rollout.batch_size=4",
        "ppo.minibatch_size=4",
        "rollout.max_new_tokens=8",
        "rollout.num_workers=1",
        "train.rounds=2",
        "checkpoint.every=2",
        "logging.dump_rollouts_every=1",
        "logging.progress=false",
        "reward.function=null",
        f"reward.remote={{url: '{server.url}', token_env: RR_SECRET}}",
    ]
    cfg = load_config(None, overrides)
    run_dir = tmp_path / "run"
    workers = RayWorkers(cfg)
    try:
        run_ppo(cfg, workers, run_dir)
    finally:
        workers.close()
        server.stop()
    assert [r["round"] for r in read_metrics(run_dir / "metrics.jsonl")] == [0, 1]
    assert len(server.requests) >= 2 and server.answered >= 2  # authorized: scored
    assert "RR_SECRET" in (run_dir / "config.yaml").read_text()  # the name, not the value
    out, err = capfd.readouterr()
    assert SECRET not in out and SECRET not in err
    assert _files_holding(run_dir, SECRET.encode()) == []
    assert _files_holding(Path(ray_cluster), SECRET.encode()) == []  # Ray's session logs
