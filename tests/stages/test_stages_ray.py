"""The stages on Ray: two DeepSpeed ZeRO-2 ranks as actors (gloo) take the same steps as one
in-process torch rank, and save the same model."""

from __future__ import annotations

import pytest
import torch
from test_sft import sft_rows, write_jsonl
from transformers import AutoModelForCausalLM

from rlhf_ray.metrics import read_metrics
from rlhf_ray.stage_config import load_sft_config
from rlhf_ray.stages import run_sft, sft_role
from rlhf_ray.workers.inprocess import InProcessStage

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_sft_on_two_ray_ranks_matches_one_in_process_rank(ray_cluster, tmp_path):
    from rlhf_ray.distributed import RayStage

    data = [f"data.path={write_jsonl(tmp_path / 'd.jsonl', sft_rows(40, seed=0))}",
            "data.eval_fraction=0.2", "data.max_tokens=64", "data.max_prompt_tokens=48",
            "train.epochs=1", "train.batch_size=8", "optim.lr=3e-3",
            "logging.progress=false"]  # fmt: skip
    ray_cfg = load_sft_config(None, [*data, "learner.num_ranks=2", "learner.zero_stage=2"])
    one_cfg = load_sft_config(None, [*data, "learner.num_ranks=1", "learner.engine=torch"])

    workers = RayStage(sft_role(ray_cfg), ray_cfg.cluster, ray_cfg.train.dist_timeout_s)
    try:
        on_ray = run_sft(ray_cfg, workers, tmp_path / "ray")
    finally:
        workers.close()
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
