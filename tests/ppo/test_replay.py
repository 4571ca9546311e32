"""Rollout dumps, ``rlhf-ray replay`` and ``rlhf-ray generate`` on real in-process runs (torch
engine, and DeepSpeed with one rank), with the TensorBoard and W&B sinks switched on."""

from __future__ import annotations

import json
import math

import pytest

from rlhf_ray.cli import main
from rlhf_ray.config.ppo import load_config
from rlhf_ray.errors import UserError
from rlhf_ray.observe.metrics import read_metrics
from rlhf_ray.ppo.dumps import dump_paths, load_ppo_batch, read_dump
from rlhf_ray.ppo.loop import run_ppo
from rlhf_ray.ppo.replay import checkpoint_before, replay_round
from rlhf_ray.workers.inprocess import InProcessWorkers

TINY = ["rollout.batch_size=8", "ppo.minibatch_size=4", "ppo.epochs=2", "rollout.num_workers=2",
        "rollout.max_new_tokens=6", "logging.progress=false", "checkpoint.every=1",
        "checkpoint.keep_last=5", "logging.dump_rollouts_every=1"]  # fmt: skip
TORCH = ["policy.engine=torch", "policy.num_ranks=1", "value.engine=torch"]


def _run(tmp_path_factory, name: str, overrides: list[str]):
    run_dir = tmp_path_factory.mktemp(name) / "run"
    cfg = load_config(None, [*TINY, *overrides])
    run_ppo(cfg, InProcessWorkers(cfg), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def torch_run(tmp_path_factory):
    sinks = ["logging.tensorboard=true", "logging.wandb=true", "logging.wandb_mode=offline"]
    return _run(tmp_path_factory, "torch", [*TORCH, "train.rounds=3", *sinks])


def _assert_reproduced(run_dir, round_index: int) -> dict:
    result = replay_round(run_dir, round_index)
    logged = read_metrics(run_dir / "metrics.jsonl")[round_index]
    for key in ("ppo/policy_loss", "ppo/value_loss"):
        assert abs(result.replayed[key] - logged[key]) <= 1e-6, key
    assert result.differences().keys() >= {"ppo/clipfrac", "ppo/approx_kl", "ppo/entropy"}
    return result.replayed


def test_replay_reproduces_the_logged_losses_torch_engine(torch_run, capsys):
    _assert_reproduced(torch_run, 0)  # from the initial weights, rebuilt from the config
    assert main(["replay", str(torch_run), "--round", "2", "--json"]) == 0
    out = capsys.readouterr().out
    replayed = json.loads(out.strip().splitlines()[-1])
    logged = read_metrics(torch_run / "metrics.jsonl")[2]
    assert replayed["round"] == 2
    assert abs(replayed["ppo/policy_loss"] - logged["ppo/policy_loss"]) <= 1e-6
    assert abs(replayed["ppo/value_loss"] - logged["ppo/value_loss"]) <= 1e-6
    assert "reproduced within 1e-06" in out and "checkpoints/round_000001" in out


def test_replay_reproduces_the_logged_losses_deepspeed_one_rank(tmp_path_factory):
    deepspeed = ["policy.engine=deepspeed", "value.engine=deepspeed", "policy.zero_stage=2"]
    run_dir = _run(tmp_path_factory, "ds", ["train.rounds=2", *deepspeed])
    _assert_reproduced(run_dir, 1)


def test_dumped_rows_hold_text_ids_scores_returns_and_provenance(torch_run):
    cfg = load_config(torch_run / "config.yaml")
    for round_index in range(3):
        rows = read_dump(dump_paths(torch_run, round_index)[0])
        assert len(rows) == 8
        assert {r["weight_version"] for r in rows} == {round_index}
        workers = [r["worker"] for r in rows]  # contiguous shards of the pool of 2
        assert set(workers) <= {0, 1} and workers == sorted(workers)
        for r in rows:
            assert len(r["response_ids"]) <= 6 and r["prompt"] and r["prompt_ids"]
            assert r["has_eos"] == (r["response_ids"][-1] == 256)  # EOS of the byte tokenizer
            # KL-penalised return: shaped score minus beta times the summed per-token KL
            expected = r["shaped_score"] - cfg.ppo.kl_coef * r["kl"]
            assert math.isclose(r["kl_penalized_return"], expected, abs_tol=1e-5)
            assert r["advantage"]["min"] <= r["advantage"]["mean"] <= r["advantage"]["max"]
        batch, info = load_ppo_batch(dump_paths(torch_run, round_index)[1])
        assert len(batch) == 8 and info["round"] == round_index
        assert batch.input_ids.shape[1] == batch.prompt_len + 6


def test_sinks_sync_check_plots_and_generate_from_the_run(torch_run, tmp_path):
    rows = read_metrics(torch_run / "metrics.jsonl")
    assert [r["sync/logprob_max_abs_diff"] for r in rows] == [0.0] * 3
    assert list((torch_run / "tb").glob("events.out.tfevents.*"))
    offline = list((torch_run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert offline and offline[0].stat().st_size > 0
    assert main(["plot", str(torch_run)]) == 0
    assert (torch_run / "plots" / "reward.png").exists()
    out = tmp_path / "samples.jsonl"
    args = ["generate", "--policy", str(torch_run / "policy"), "--num-prompts", "3"]
    assert main([*args, "--out", str(out)]) == 0
    samples = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(samples) == 3 and all(0 <= s["score"] <= 1 for s in samples)
    again = tmp_path / "again.jsonl"
    assert main([*args, "--out", str(again)]) == 0
    assert again.read_text() == out.read_text()  # seeded by train.seed: the same samples


def test_replay_says_what_is_missing(tmp_path):
    (tmp_path / "checkpoints" / "round_000003").mkdir(parents=True)
    with pytest.raises(UserError, match=r"after round 4 .* checkpoint.every=1"):
        checkpoint_before(tmp_path, 5)
    with pytest.raises(UserError, match="not a run dir"):
        replay_round(tmp_path, 5)
    (tmp_path / "config.yaml").write_text("{}")
    with pytest.raises(UserError, match="logging.dump_rollouts_every"):
        replay_round(tmp_path, 5)


@pytest.mark.parametrize("prefix", ["", "bf16_"])  # DeepSpeed names bf16 runs' states bf16_*
def test_replay_refuses_a_state_saved_by_other_ranks_than_the_config_says(tmp_path, prefix):
    from rlhf_ray.ppo.replay import roles_and_ranks

    state = tmp_path / "policy_state" / "state"
    state.mkdir(parents=True)
    for rank in range(3):
        (state / f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_text("")
        (state / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").write_text("")
    (tmp_path / "value_state" / "state").mkdir(parents=True)
    two = load_config(None, ["policy.num_ranks=2"])
    with pytest.raises(UserError, match="3 ZeRO ranks but the run trained it on 2"):
        roles_and_ranks(two, tmp_path, on_ray=True)
    assert roles_and_ranks(two, None, on_ray=True) == {"policy": 2, "value": 1}
    assert roles_and_ranks(two, None, on_ray=False) == {"policy": 1, "value": 1}  # in-process
