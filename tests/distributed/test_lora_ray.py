"""A LoRA policy (DeepSpeed ZeRO-2, 2 ranks) and a LoRA critic through ``RayWorkers`` with the
HF rollout backend and ``reference.from_policy_base``: the adapters alone reach the Ray rollout
workers, the sync check passes after every sync, the reference is the policy's base (no
reference actor), ``rlhf-ray replay`` of the run reproduces a round's losses on its 2 ranks,
and a run whose policy rank is SIGKILLed mid-run recovers from its checkpoint and ends with the
uninterrupted run's adapters exactly (max abs diff 0)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import torch
from ray._private import state as ray_state
from safetensors.torch import load_file

from rlhf_ray.cli import main
from rlhf_ray.config.ppo import SYNC_TOLERANCE, load_config
from rlhf_ray.distributed import RayWorkers
from rlhf_ray.observe.metrics import read_metrics
from rlhf_ray.ppo.checkpoint import latest_checkpoint
from rlhf_ray.ppo.recovery import run_ppo_recovering

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROUNDS = 2
OVERRIDES = ["policy.lora.r=4", "value.lora.r=4", "reference.from_policy_base=true",
             "rollout.batch_size=8", "ppo.minibatch_size=4", "rollout.max_new_tokens=8",
             f"train.rounds={ROUNDS}", "checkpoint.every=1", "checkpoint.keep_last=10",
             "logging.dump_rollouts_every=1", "logging.progress=false"]  # fmt: skip


def _alive() -> dict[str, int]:
    return {a["Name"]: a["Pid"] for a in ray_state.actors().values() if a["State"] == "ALIVE"}


def _kill_policy_rank_1(run_dir, stop: threading.Event, seen: list[str]) -> None:
    """Once a round is logged and a checkpoint is complete: note the run's actors, then
    SIGKILL ``policy-1`` (its peer fails in its collective, the run restarts the learners)."""
    path = run_dir / "metrics.jsonl"
    while not stop.is_set():
        logged = len(path.read_text().splitlines()) if path.exists() else 0
        if logged >= 1 and latest_checkpoint(run_dir) is not None:
            actors = _alive()
            seen.extend(actors)
            os.kill(actors["policy-1"], signal.SIGKILL)
            return
        time.sleep(0.05)


def _run(run_dir, disrupt: bool = False) -> list[str]:
    """The run; with ``disrupt``, policy rank 1 is killed mid-run. Returns the actors seen."""
    cfg = load_config(None, OVERRIDES)
    assert cfg.policy.num_ranks == 2 and cfg.policy.zero_stage == 2  # the defaults
    seen: list[str] = []
    stop = threading.Event()
    thread = threading.Thread(target=_kill_policy_rank_1, args=(run_dir, stop, seen))
    workers = RayWorkers(cfg)
    if disrupt:
        thread.start()
    try:
        run_ppo_recovering(cfg, workers, run_dir)
    finally:
        stop.set()
        if disrupt:
            thread.join()
        workers.close()
    return seen


@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    _run(root / "whole")
    seen = _run(root / "killed", disrupt=True)
    return root, seen


def test_adapters_alone_reach_the_ray_workers_and_match_the_learner(runs):
    root, seen = runs
    rows = read_metrics(root / "whole" / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(ROUNDS))
    assert all(r["sync/bytes"] * 10 <= r["sync/full_bytes"] for r in rows)
    assert all(r["sync/logprob_max_abs_diff"] <= SYNC_TOLERANCE["float32"] for r in rows)
    assert all(r["rollout/logprob_gap"] <= 1e-5 for r in rows)  # workers sample the learner's
    # the reference is the policy's base: no actor, KL 0 while the adapters are fresh
    assert {"policy-0", "policy-1", "value-0", "rollout-0"} <= set(seen)
    assert not any(name.startswith("reference-") for name in seen)
    assert rows[0]["ppo/kl"] == pytest.approx(0.0, abs=1e-6)
    assert rows[-1]["ppo/kl"] != pytest.approx(0.0, abs=1e-6)


def test_replay_of_a_lora_round_on_two_ranks_reproduces_its_losses(runs, capsys):
    root, _ = runs
    capsys.readouterr()
    assert main(["replay", str(root / "whole"), "--round", "1", "--json"]) == 0
    replayed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    logged = read_metrics(root / "whole" / "metrics.jsonl")[1]
    for key in ("ppo/policy_loss", "ppo/value_loss"):
        assert abs(replayed[key] - logged[key]) <= 1e-6, key


def test_a_killed_policy_rank_recovers_to_the_uninterrupted_adapters_exactly(runs):
    root, _ = runs
    rows = read_metrics(root / "killed" / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(ROUNDS))
    assert rows[-1]["train/learner_restarts"] == 1
    for role in ("policy", "value"):
        path = f"{role}/adapter/adapter_model.safetensors"
        whole, killed = load_file(root / "whole" / path), load_file(root / "killed" / path)
        assert whole.keys() == killed.keys()
        assert max((whole[k] - killed[k]).abs().max().item() for k in whole) == 0.0, role
    assert torch.equal(
        torch.tensor([r["ppo/policy_loss"] for r in rows]),
        torch.tensor([r["ppo/policy_loss"] for r in read_metrics(root / "whole/metrics.jsonl")]),
    )
