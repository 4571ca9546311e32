"""The stages on Ray: two DeepSpeed ZeRO-2 ranks as actors (gloo) take the same steps as one
in-process torch rank, and save the same model; with rank 1 SIGKILLed mid-run, the group is
restarted from the newest checkpoint and ends with the uninterrupted run's weights."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from test_sft import sft_rows, write_jsonl
from transformers import AutoModelForCausalLM

from rlhf_ray.config.stages import load_sft_config
from rlhf_ray.observe.metrics import read_metrics
from rlhf_ray.stages import run_sft, sft_role
from rlhf_ray.stages.checkpoint import run_stage_recovering
from rlhf_ray.workers.inprocess import InProcessStage

pytestmark = [pytest.mark.ray, pytest.mark.slow]

RAY = ["learner.num_ranks=2", "learner.zero_stage=2", "checkpoint.every=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[str]:
    path = write_jsonl(tmp_path_factory.mktemp("sft") / "d.jsonl", sft_rows(40, seed=0))
    return [f"data.path={path}", "data.eval_fraction=0.2", "data.max_tokens=64",
            "data.max_prompt_tokens=48", "train.epochs=1", "train.batch_size=8",
            "optim.lr=3e-3", "logging.progress=false"]  # fmt: skip


@pytest.fixture(scope="module")
def on_ray(ray_cluster, data, tmp_path_factory):
    """The uninterrupted SFT run on two ZeRO-2 ranks (4 steps, a checkpoint every 2), once."""
    from rlhf_ray.distributed import RayStage

    cfg = load_sft_config(None, [*data, *RAY])
    workers = RayStage(sft_role(cfg), cfg.cluster, cfg.train.dist_timeout_s)
    try:
        return run_sft(cfg, workers, tmp_path_factory.mktemp("sft") / "ray")
    finally:
        workers.close()


def test_sft_on_two_ray_ranks_matches_one_in_process_rank(on_ray, data, tmp_path):
    one_cfg = load_sft_config(None, [*data, "learner.num_ranks=1", "learner.engine=torch"])
    local = InProcessStage(sft_role(one_cfg), one_cfg.train.dist_timeout_s)
    try:
        in_process = run_sft(one_cfg, local, tmp_path / "local")
    finally:
        local.close()

    ray_rows = read_metrics(on_ray.run_dir / "metrics.jsonl")
    local_rows = read_metrics(in_process.run_dir / "metrics.jsonl")
    assert len(ray_rows) == len(local_rows) == 4 + 1  # 32 train rows / 8: 4 steps, 1 epoch row
    for a, b in zip(ray_rows, local_rows, strict=True):
        for key in ("train/loss", "eval/loss", "epoch/train_loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5), key
    assert ray_rows[-1]["eval/loss"] < ray_rows[0]["train/loss"]
    a = AutoModelForCausalLM.from_pretrained(on_ray.output).state_dict()
    b = AutoModelForCausalLM.from_pretrained(in_process.output).state_dict()
    for name in b:
        torch.testing.assert_close(a[name], b[name], atol=1e-4, rtol=1e-3)


def _sigkill_actor(name: str) -> None:
    from ray._private import state

    pid = next(
        a["Pid"] for a in state.actors().values() if a["Name"] == name and a["State"] == "ALIVE"
    )
    os.kill(pid, signal.SIGKILL)


def test_a_sigkilled_stage_rank_is_recovered_to_the_uninterrupted_weights(
    on_ray, data, tmp_path, capsys
):
    from rlhf_ray.distributed import RayStage

    class KillRankOneOnce(RayStage):
        """Rank 1's process is SIGKILLed as step 3 starts (after the step-2 checkpoint)."""

        killed = False

        def train_step(self, epoch: int, step: int) -> dict[str, float]:
            if step == 2 and not self.killed:
                KillRankOneOnce.killed = True
                _sigkill_actor("sft-1")
            return super().train_step(epoch, step)

    cfg = load_sft_config(None, [*data, *RAY])
    workers = KillRankOneOnce(sft_role(cfg), cfg.cluster, cfg.train.dist_timeout_s)
    try:
        done = run_stage_recovering(run_sft, cfg, workers, tmp_path / "killed", False)
    finally:
        workers.close()
    out = capsys.readouterr().out
    assert "learner group lost a rank" in out and "restarting the learners from" in out
    rows = read_metrics(done.run_dir / "metrics.jsonl")
    steps = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]  # every step once
    assert steps[-1]["train/learner_restarts"] == 1 and steps[-1]["train/replacements"] == 1
    want = AutoModelForCausalLM.from_pretrained(on_ray.output).state_dict()
    got = AutoModelForCausalLM.from_pretrained(done.output).state_dict()
    assert max(float((want[k] - got[k]).abs().max()) for k in want) <= 1e-6
