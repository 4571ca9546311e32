"""Checkpoints and exact resume, in one process: a run that crashes after a checkpoint and is
resumed ends exactly where the uninterrupted run does."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf_ray.config.ppo import load_config, to_yaml
from rlhf_ray.errors import UserError
from rlhf_ray.observe.metrics import read_metrics
from rlhf_ray.ppo.checkpoint import (
    RESUMABLE_CHANGES,
    check_resumable,
    latest_checkpoint,
    save_checkpoint,
    truncate_metrics,
)
from rlhf_ray.ppo.loop import run_ppo
from rlhf_ray.ppo.recovery import run_ppo_recovering
from rlhf_ray.workers.inprocess import InProcessWorkers
from rlhf_ray.workers.interface import LearnerLostError
from tests.helpers.crashing_workers import CrashAt

BASE = ["policy.engine=torch", "policy.num_ranks=1", "value.engine=torch", "train.rounds=6",
        "rollout.batch_size=8", "ppo.minibatch_size=4", "checkpoint.every=2",
        "logging.progress=false", "ppo.adaptive_kl=true"]  # fmt: skip
COMPARED = ["round", "rollout/reward_mean", "ppo/kl", "ppo/kl_coef", "ppo/policy_loss",
            "ppo/value_loss", "weights/version"]  # fmt: skip


def _rows(path):
    return [{k: r[k] for k in COMPARED} for r in read_metrics(path / "metrics.jsonl")]


def test_resume_after_a_crash_matches_the_uninterrupted_run(tmp_path):
    cfg = load_config(None, BASE)
    run_ppo(cfg, InProcessWorkers(cfg), tmp_path / "whole")

    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_ppo(cfg, CrashAt(cfg, crash_round=4), crashed)
    assert latest_checkpoint(crashed).name == "round_000003"
    assert len(read_metrics(crashed / "metrics.jsonl")) == 4
    # a half-written checkpoint of a later crash is never picked, a torn metrics line is dropped
    (crashed / "checkpoints" / ".tmp-round_000005").mkdir()
    with (crashed / "metrics.jsonl").open("a") as f:
        f.write('{"round": 4, "rollout/rew')

    run_ppo(cfg, InProcessWorkers(cfg), crashed, resume=True)
    resumed_rows, whole_rows = _rows(crashed), _rows(tmp_path / "whole")
    assert len(resumed_rows) == len(whole_rows)
    for got, want in zip(resumed_rows, whole_rows, strict=True):
        assert got == pytest.approx(want)
    whole = AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "policy").state_dict()
    resumed = AutoModelForCausalLM.from_pretrained(crashed / "policy").state_dict()
    for name, value in whole.items():
        assert torch.equal(value, resumed[name]), name


def test_resume_refuses_a_config_that_changes_the_computation(tmp_path):
    cfg = load_config(None, BASE)
    run_ppo(cfg, InProcessWorkers(cfg), tmp_path)
    changed = load_config(None, [*BASE, "ppo.clip_eps=0.3"])
    with pytest.raises(UserError, match=r"ppo\.clip_eps"):
        run_ppo(changed, InProcessWorkers(changed), tmp_path, resume=True)
    longer = load_config(None, [*BASE, "train.rounds=7"])  # more rounds is fine
    run_ppo(longer, InProcessWorkers(longer), tmp_path, resume=True)
    assert [r["round"] for r in read_metrics(tmp_path / "metrics.jsonl")] == list(range(7))


def test_resume_without_a_checkpoint_starts_over(tmp_path):
    cfg = load_config(None, [*BASE, "checkpoint.every=0", "train.rounds=2"])
    (tmp_path / "metrics.jsonl").write_text('{"round": 0}\n')
    run_ppo(cfg, InProcessWorkers(cfg), tmp_path, resume=True)
    assert [r["round"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1]


# -- safe writes, torn lines and what resume accepts (no training run) -------------------------


class FakeWorkers:
    """Writes a file per part; ``fail_state`` makes ``save_state`` die mid-write."""

    def __init__(self, fail_state: bool = False):
        self.fail_state = fail_state

    def save(self, directory, merged=True):
        for part in ("policy", "value"):
            (directory / part).mkdir(parents=True, exist_ok=True)
            (directory / part / "model.safetensors").write_bytes(b"w")

    def save_state(self, directory):
        (directory / "policy_state").mkdir()
        if self.fail_state:
            raise RuntimeError("killed mid-write")
        (directory / "value_state").mkdir()


class FakeTokenizer:
    def save(self, directory):
        (directory / "tokenizer.json").write_text("{}")


def test_a_checkpoint_cut_off_mid_write_is_never_picked_and_old_ones_survive(tmp_path):
    cfg = load_config(None, [*BASE, "checkpoint.keep_last=1"])
    save_checkpoint(FakeWorkers(), FakeTokenizer(), cfg, tmp_path, {"round": 1})
    with pytest.raises(RuntimeError, match="mid-write"):
        save_checkpoint(FakeWorkers(fail_state=True), FakeTokenizer(), cfg, tmp_path, {"round": 3})
    # the old one is still there (keep_last=1 applies only after a new one is in place)
    assert latest_checkpoint(tmp_path).name == "round_000001"
    # a directory missing parts (a copy cut off) is not picked either
    partial = tmp_path / "checkpoints" / "round_000005"
    (partial / "policy").mkdir(parents=True)
    (partial / "driver_state.json").write_text("{}")
    assert latest_checkpoint(tmp_path).name == "round_000001"
    shutil.rmtree(partial)
    # the next good save replaces it and only then removes the old one; saving a round again
    # (after a learner restart) swaps it in place
    save_checkpoint(FakeWorkers(), FakeTokenizer(), cfg, tmp_path, {"round": 3})
    save_checkpoint(FakeWorkers(), FakeTokenizer(), cfg, tmp_path, {"round": 3})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["round_000003"]


def test_resume_drops_a_torn_last_metrics_line_and_refuses_a_bad_middle_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 0}\n{"round": 1}\n{"round": 2}\n{"round": 3, "rollout/rew')
    truncate_metrics(path, 1)
    assert read_metrics(path) == [{"round": 0}, {"round": 1}]
    path.write_text('{"round": 0}\n{"rou\n{"round": 1}\n')
    with pytest.raises(UserError, match="line 2"):
        truncate_metrics(path, 1)


ALLOWED = {  # one changed value for every setting resume accepts
    "train.rounds": 99, "train.dist_timeout_s": 30, "train.phase_timeout_s": 5.0,
    "train.max_restarts": 0, "train.max_bad_steps": 1, "checkpoint.every": 3,
    "checkpoint.keep_last": 5, "logging.progress": True, "logging.tensorboard": True,
    "cluster.nodes": [{"cpus": 8}], "cluster.num_cpus": 3, "cluster.namespace": "other",
    "cluster.actor_start_timeout_s": 9.0, "cluster.learner_resources": {"learner_node": 0.1},
    "cluster.spread": False, "rollout.num_workers": 5, "rollout.num_cpus_per_worker": 0.5,
    "policy.num_cpus_per_rank": 0.5, "value.num_cpus_per_rank": 0.5, "reference.num_cpus": 0.5,
    "reward.num_cpus": 0.5, "data.on_bad_row": "skip", "logging.wandb": True,
    "logging.wandb_project": "p", "logging.wandb_mode": "offline", "logging.wandb_dir": "/tmp/w",
    "logging.dump_rollouts_every": 2, "sync.max_logprob_diff": 0.5, "rollout.max_logprob_gap": 0.5,
}  # fmt: skip
REFUSED = {  # settings that change what the run computes
    "train.seed": 1, "ppo.clip_eps": 0.3, "ppo.epochs": 2, "rollout.temperature": 0.7,
    "rollout.max_new_tokens": 4, "policy.optim.lr": 0.01, "policy.zero_stage": 3,
    "policy.engine": "deepspeed", "rollout.num_gpus_per_worker": 1, "data.max_prompt_tokens": 9,
    "reward.function": "tests.x:y", "value.model.hidden_size": 32, "data.prompts": "other.jsonl",
}  # fmt: skip


def _checkpoint_of(tmp_path, cfg):
    ckpt = tmp_path / "round_000000"
    ckpt.mkdir(exist_ok=True)
    (ckpt / "config.yaml").write_text(to_yaml(cfg))
    return ckpt


def test_the_allow_list_is_exactly_the_tested_settings():
    assert set(ALLOWED) == set(RESUMABLE_CHANGES)


@pytest.mark.parametrize("key", sorted(ALLOWED))
def test_each_allowed_change_resumes(tmp_path, key):
    base = load_config(None, BASE)
    ckpt = _checkpoint_of(tmp_path, base)
    changed = _with(base, key, ALLOWED[key])
    check_resumable(ckpt, changed)


@pytest.mark.parametrize("key", sorted(REFUSED))
def test_a_change_to_the_computation_is_refused_naming_the_setting(tmp_path, key):
    base = load_config(None, BASE)
    ckpt = _checkpoint_of(tmp_path, base)
    changed = _with(base, key, REFUSED[key])
    with pytest.raises(UserError, match=re.escape(key)):
        check_resumable(ckpt, changed)


def _with(cfg, key: str, value):
    tree = cfg.model_dump(mode="json")
    node = tree
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    assert leaf in node, key
    node[leaf] = value
    return type(cfg).model_validate(tree)


def test_engine_state_is_safetensors_and_json_never_a_pickle(tmp_path):
    from rlhf_ray.engines.training import TorchEngine

    cfg = load_config(None, BASE)
    torch.manual_seed(0)
    engine = TorchEngine(torch.nn.Linear(3, 2), cfg.policy.optim)
    engine.module(torch.ones(4, 3)).sum().backward()
    engine.step()
    engine.save_state(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "torch_engine.json", "torch_engine.safetensors"
    ]  # fmt: skip
    other = TorchEngine(torch.nn.Linear(3, 2), cfg.policy.optim)
    other.load_state(str(tmp_path))
    for a, b in zip(engine.module.parameters(), other.module.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(engine.optimizer.state.values(), other.optimizer.state.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


class LosesALearner(InProcessWorkers):
    def update(self, batch, round_index):
        raise LearnerLostError("learner policy-1 died during update")


def test_a_lost_learner_without_a_checkpoint_stops_with_a_clear_error(tmp_path):
    cfg = load_config(None, [*BASE, "checkpoint.every=0", "train.rounds=1"])
    with pytest.raises(UserError, match=r"policy-1 died during update.*checkpoint\.every"):
        run_ppo_recovering(cfg, LosesALearner(cfg), tmp_path)


def test_resume_at_a_prompt_epoch_boundary_trains_the_remaining_rounds(tmp_path):
    """16 prompts, 8 per round: the checkpoint after round 1 is taken exactly as the sampler
    finishes an epoch (cursor back to 0); the resumed run trains round 2 on the next epoch
    instead of silently training nothing (veRL #7401)."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "Say {i} in words."}}\n' for i in range(16)))
    cfg = load_config(None, [*BASE, "train.rounds=3", f"data.prompts={prompts}"])
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_ppo(cfg, CrashAt(cfg, crash_round=2), crashed)
    checkpoint = latest_checkpoint(crashed)
    state = json.loads((checkpoint / "driver_state.json").read_text())
    assert checkpoint.name == "round_000001"
    assert state["sampler"]["epoch"] == 1 and state["sampler"]["cursor"] == 0  # epoch done

    assert run_ppo(cfg, InProcessWorkers(cfg), crashed, resume=True).rounds == 3
    rows = read_metrics(crashed / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[2]["rollout/num_samples"] == 8 and rows[2]["weights/version"] == 2
    before = AutoModelForCausalLM.from_pretrained(checkpoint / "policy").state_dict()
    after = AutoModelForCausalLM.from_pretrained(crashed / "policy").state_dict()
    assert any(not torch.equal(v, after[k]) for k, v in before.items())  # round 2 trained
