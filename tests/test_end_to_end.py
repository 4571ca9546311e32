"""What a new user runs: ``rlhf-ray ppo`` on its embedded default, and with their own reward
function, each on a local Ray started by the CLI in a private temp dir."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import mean

import pytest
from conftest import wait_no_processes_under
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_ray.observe.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.ray]

CORE_KEYS = {
    "round",
    "rollout/reward_mean",
    "rollout/num_samples",
    "ppo/kl",
    "ppo/policy_loss",
    "ppo/value_loss",
    "ppo/clipfrac",
    "ppo/entropy",
    "time/round",
    "weights/version",
    "time/generate",
    "time/score",
    "time/advantage",
    "time/update",
    "time/sync",
}


# Known-harmless dependency output that the console must not show (rlhf_ray/observe/quiet.py).
NOISE = (
    "Token authentication",  # Ray, starting a local cluster
    "Started a local Ray instance",
    "built successfully",  # DeepSpeed's shared-memory comm op, per learner rank
    "FutureWarning",  # torch.distributed deprecations, per learner rank
    "Writing model shards",  # transformers' progress bar, per save
    "deduplicates logs",  # Ray's notice, shown once something repeats
)


def run_cli(args: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run ``rlhf-ray`` as a user would, with Ray's files in a private short temp dir, and
    check that no Ray process of it survives."""
    ray_tmp = tempfile.mkdtemp(prefix="rr-", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf_ray.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    left = wait_no_processes_under(ray_tmp)
    assert not left, f"processes outlived the run: {[p.pid for p in left]}"
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "killed by `ray.kill`" not in proc.stderr + proc.stdout  # a quiet teardown
    return proc


def first_last(rows: list[dict], key: str, n: int = 5) -> tuple[float, float]:
    values = [r[key] for r in rows]
    return mean(values[:n]), mean(values[-n:])


@pytest.mark.parametrize("transport", ["object_store", "collective"])
def test_default_run(tmp_path, transport):
    """The default run; and the same with the collective sync transport (gloo here)."""
    run_dir = tmp_path / "run"
    extra = [] if transport == "object_store" else [f"sync.transport={transport}"]
    proc = run_cli(["ppo", "--run-dir", str(run_dir), *extra], cwd=tmp_path)
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(30))
    assert all(set(r) >= CORE_KEYS for r in rows)
    assert [r["weights/version"] for r in rows] == list(range(30))
    first, last = first_last(rows, "rollout/reward_mean")
    print(f"default run: reward_mean first 5 rounds {first:.3f}, last 5 rounds {last:.3f}")
    assert last > first + 0.1
    assert all(math.isfinite(r["ppo/kl"]) for r in rows)
    progress = [line for line in proc.stdout.splitlines() if line.startswith("round ")]
    assert len(progress) == 30 and f"run dir: {run_dir.resolve()}" in proc.stdout
    assert all(r["sync/logprob_max_abs_diff"] <= 1e-6 for r in rows)  # Ray workers == learners
    assert all(r["sync/bytes"] > 0 and r["sync/seconds"] > 0 for r in rows)
    assert "policy parameters held per rank (rank 0:" in proc.stdout
    console = proc.stdout + proc.stderr
    assert [n for n in NOISE if n in console] == [], console[-3000:]
    model = AutoModelForCausalLM.from_pretrained(run_dir / "policy")
    tok = AutoTokenizer.from_pretrained(run_dir / "policy")
    ids = tok("Hello", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4
    assert (run_dir / "config.yaml").exists() and (run_dir / "value").is_dir()


USER_REWARD = '''
from pathlib import Path

def score(prompts, responses):
    """Fraction of uppercase characters; records each call next to this file."""
    with open(Path(__file__).with_name("calls.txt"), "a") as f:
        f.write(f"{len(responses)}\\n")
    return [sum(c.isupper() for c in r) / max(len(r), 1) for r in responses]
'''


def test_user_reward_function_is_called_and_learned(tmp_path):
    (tmp_path / "mymodule.py").write_text(USER_REWARD)
    run_dir = tmp_path / "run"
    run_cli(
        ["ppo", "--run-dir", str(run_dir), "reward.function=mymodule:score", "train.rounds=24"],
        cwd=tmp_path,
    )
    calls = (tmp_path / "calls.txt").read_text().split()
    assert calls == ["32"] * 24  # once per round, on every rollout sample
    rows = read_metrics(run_dir / "metrics.jsonl")
    first, last = first_last(rows, "rollout/reward_mean")
    print(f"user reward: reward_mean first 5 rounds {first:.3f}, last 5 rounds {last:.3f}")
    assert last > first + 0.08
