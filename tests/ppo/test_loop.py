"""run_ppo in one process: the default config learns, and the run dir holds what it promises."""

from __future__ import annotations

import math
from statistics import mean

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_ray.config.ppo import load_config
from rlhf_ray.observe.metrics import read_metrics
from rlhf_ray.observe.runs import new_run_dir
from rlhf_ray.ppo.loop import check_rollout, run_ppo
from rlhf_ray.types import Rollout
from rlhf_ray.workers.inprocess import InProcessWorkers
from rlhf_ray.workers.interface import StaleWeightsError, split_rows


def test_in_process_default_config_raises_reward(tmp_path):
    cfg = load_config()  # the embedded default, DeepSpeed engines with one in-process rank
    run_dir = tmp_path / "run"
    run_ppo(cfg, InProcessWorkers(cfg), run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    rewards = [r["rollout/reward_mean"] for r in rows]
    first, last = mean(rewards[:5]), mean(rewards[-5:])
    print(f"in-process default: reward_mean first 5 rounds {first:.3f}, last 5 {last:.3f}")
    assert len(rows) == cfg.train.rounds
    assert last > first + 0.1
    assert all(math.isfinite(r["ppo/kl"]) for r in rows)
    assert rows[0]["ppo/kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at first
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == cfg.model_dump(mode="json")
    model = AutoModelForCausalLM.from_pretrained(run_dir / "policy")
    tok = AutoTokenizer.from_pretrained(run_dir / "policy")
    assert model.config.vocab_size >= len(tok) and tok.pad_token_id != tok.eos_token_id


def test_checkpoints_are_complete_and_pruned(tmp_path):
    cfg = load_config(
        None,
        [
            "policy.engine=torch",
            "policy.num_ranks=1",
            "value.engine=torch",
            "train.rounds=5",
            "checkpoint.every=2",
            "checkpoint.keep_last=1",
            "rollout.batch_size=8",
            "ppo.minibatch_size=8",
            "logging.progress=false",
        ],
    )
    run_ppo(cfg, InProcessWorkers(cfg), tmp_path)
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert checkpoints == ["round_000003"]  # round_000001 pruned, no temp dir left
    ckpt = tmp_path / "checkpoints" / "round_000003"
    assert (ckpt / "policy" / "config.json").exists() and (ckpt / "value").is_dir()
    assert (ckpt / "config.yaml").exists() and (ckpt / "driver_state.json").exists()


def _rollout(versions: list[int], index: list[int]) -> Rollout:
    n = len(versions)
    return Rollout(
        prompt_ids=torch.zeros(n, 2, dtype=torch.long),
        prompt_mask=torch.ones(n, 2),
        prompt_index=torch.tensor(index),
        response_ids=torch.zeros(n, 3, dtype=torch.long),
        response_mask=torch.ones(n, 3),
        has_eos=torch.ones(n, dtype=torch.bool),
        sampler_logprobs=torch.zeros(n, 3),
        weight_version=torch.tensor(versions),
        prompts=["p"] * n,
        responses=["r"] * n,
        worker_id=torch.zeros(n, dtype=torch.long),
    )


def test_round_refuses_stale_missing_or_duplicated_samples():
    check_rollout(_rollout([4, 4], [0, 1]), 4, [0, 1])
    check_rollout(_rollout([4, 4], [7, 7]), 4, [7, 7])  # a prompt drawn twice at an epoch edge
    with pytest.raises(StaleWeightsError):
        check_rollout(_rollout([4, 3], [0, 1]), 4, [0, 1])
    with pytest.raises(RuntimeError, match="2 samples for 3 prompts"):
        check_rollout(_rollout([4, 4], [0, 1]), 4, [0, 1, 2])
    with pytest.raises(RuntimeError, match="lost or duplicated"):
        check_rollout(_rollout([4, 4], [1, 1]), 4, [0, 1])


def test_prompts_split_over_workers_cover_every_row_once():
    for rows, parts in [(32, 2), (32, 3), (5, 8), (1, 1)]:
        slices = split_rows(rows, parts)
        covered = [i for s in slices for i in range(rows)[s]]
        assert covered == list(range(rows)) and all(s.stop > s.start for s in slices)


def test_new_run_dirs_are_fresh(tmp_path):
    first = new_run_dir(tmp_path)
    first.mkdir()
    assert new_run_dir(tmp_path) != first


def test_scale_requests_are_validated_and_read_back(tmp_path):
    from rlhf_ray.errors import UserError
    from rlhf_ray.ppo.control import request_rollout_workers, requested_rollout_workers

    assert requested_rollout_workers(tmp_path, default=2) == 2
    with pytest.raises(UserError, match="not a run dir"):
        request_rollout_workers(tmp_path, 3)
    (tmp_path / "config.yaml").write_text("{}")
    with pytest.raises(UserError, match="at least 1"):
        request_rollout_workers(tmp_path, 0)
    request_rollout_workers(tmp_path, 3)
    assert requested_rollout_workers(tmp_path, default=2) == 3


def test_in_process_pool_resizes_between_rounds(tmp_path):
    from rlhf_ray.ppo.control import request_rollout_workers

    cfg = load_config(
        None,
        [
            "policy.engine=torch",
            "policy.num_ranks=1",
            "value.engine=torch",
            "train.rounds=2",
            "rollout.batch_size=8",
            "ppo.minibatch_size=8",
            "logging.progress=false",
            "rollout.num_workers=1",
        ],
    )
    (tmp_path / "config.yaml").write_text("{}")
    request_rollout_workers(tmp_path, 3)
    run_ppo(cfg, InProcessWorkers(cfg), tmp_path)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["rollout/num_workers"] for r in rows] == [3, 3]
