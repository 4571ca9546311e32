"""The ``rlhf-ray`` command line, run as a user runs it: a subprocess, exit codes, stdout/stderr."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml

from rlhf_ray.config.ppo import load_config, to_yaml

ROLES = ("policy", "value", "reference", "reward", "rollout")


def run_cli(*args: str, cwd, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    # never a live cluster, and never this process's accelerator: each actor gets its own
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DS_ACCELERATOR")}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "rlhf_ray.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def assert_user_error(proc: subprocess.CompletedProcess, *names: str) -> None:
    """Exit 2, one line on stderr starting with the program name, naming ``names``."""
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr
    assert err.startswith("rlhf-ray:")
    assert "\n" not in err, err
    for name in names:
        assert name in err


def test_print_config_prints_the_resolved_config(tmp_path):
    proc = run_cli("ppo", "--print-config", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout) == yaml.safe_load(to_yaml(load_config()))


def test_print_config_honours_file_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  rounds: 5\nrollout:\n  num_workers: 4\n")
    overrides = ["rollout.num_workers=3", "train.seed=9", "policy.num_gpus_per_rank=1"]
    proc = run_cli("ppo", "--print-config", "--config", str(path), *overrides, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed == yaml.safe_load(to_yaml(load_config(path, overrides)))
    assert printed["train"]["rounds"] == 5
    assert printed["rollout"]["num_workers"] == 3
    assert printed["train"]["seed"] == 9
    assert printed["policy"]["num_gpus_per_rank"] == 1


def test_printed_config_is_a_valid_config_file(tmp_path):
    proc = run_cli("ppo", "--print-config", "checkpoint.every=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    path = tmp_path / "printed.yaml"
    path.write_text(proc.stdout)
    assert load_config(path) == load_config(None, ["checkpoint.every=2"])


@pytest.mark.parametrize(
    "overrides, names",
    [
        (["rollout.bach_size=4"], ["rollout.bach_size"]),
        (["rollout.batch_size=many"], ["rollout.batch_size", "many"]),
        (
            ["rollout.batch_size=24", "ppo.minibatch_size=16"],
            ["ppo.minibatch_size", "rollout.batch_size"],
        ),
        (
            ["policy.num_ranks=2", "ppo.minibatch_size=3", "rollout.batch_size=9"],
            ["ppo.minibatch_size", "policy.num_ranks"],
        ),
        (["rollout.batch_size"], ["rollout.batch_size"]),
    ],
    ids=["unknown-key", "wrong-type", "minibatch-vs-batch", "minibatch-vs-ranks", "bad-syntax"],
)
def test_config_errors_exit_2_without_traceback(tmp_path, overrides, names):
    proc = run_cli("ppo", *overrides, cwd=tmp_path)
    assert_user_error(proc, *names)
    assert proc.stdout == ""


def test_missing_config_file_exits_2(tmp_path):
    proc = run_cli("ppo", "--config", "nope.yaml", cwd=tmp_path)
    assert_user_error(proc, "nope.yaml")


def test_plan_on_a_feasible_config_prints_the_table(tmp_path):
    proc = run_cli("plan", "cluster.num_cpus=4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines() if line}
    for role in ROLES:
        assert role in rows
    assert rows["policy"][0] == "2"  # default policy.num_ranks
    assert rows["rollout"][0] == "2"  # default rollout.num_workers
    assert rows["total"][0] == "7"
    # the default engine: DeepSpeed for the 2 policy ranks, plain torch for one rank in process
    assert (
        "engines: policy deepspeed ZeRO-2 (auto: 2 ranks; in process: torch AdamW)" in proc.stdout
    )
    assert "fits" in proc.stdout
    assert proc.stderr.strip() == ""


@pytest.mark.skipif(torch.cuda.device_count() >= 8, reason="this machine has 8 GPUs")
def test_plan_that_cannot_fit_exits_1_naming_the_shortfall(tmp_path):
    proc = run_cli("plan", "policy.num_ranks=8", "policy.num_gpus_per_rank=1", cwd=tmp_path)
    assert proc.returncode == 1
    assert "needs 8 GPUs" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "policy" in proc.stdout  # the table is still printed


@pytest.fixture
def no_ray(tmp_path):
    """A ``PYTHONPATH`` entry whose ``ray`` package fails loudly if anything imports it."""
    shadow = tmp_path / "shadow"
    (shadow / "ray").mkdir(parents=True)
    (shadow / "ray" / "__init__.py").write_text("raise RuntimeError('ray was imported')\n")
    return str(shadow)


def test_unimportable_reward_function_fails_before_ray(tmp_path, no_ray):
    proc = run_cli("ppo", "reward.function=nosuchmodule:score", cwd=tmp_path, pythonpath=no_ray)
    assert_user_error(proc, "nosuchmodule")


def test_missing_reward_attribute_fails_before_ray(tmp_path, no_ray):
    (tmp_path / "my_scores.py").write_text("def other(prompts, responses):\n    return []\n")
    proc = run_cli("ppo", "reward.function=my_scores:score", cwd=tmp_path, pythonpath=no_ray)
    assert_user_error(proc, "my_scores", "score")


def test_in_process_debug_run_writes_a_run_dir(tmp_path):
    """`rlhf-ray ppo --in-process` runs the same loop without Ray and says where it wrote."""
    run_dir = tmp_path / "run"
    proc = run_cli(
        "ppo", "--in-process", "--run-dir", str(run_dir), "train.rounds=2",
        "rollout.batch_size=8", "ppo.minibatch_size=8", "policy.engine=torch",
        "policy.num_ranks=1", "value.engine=torch", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    progress = [line for line in proc.stdout.splitlines() if line.startswith("round ")]
    assert len(progress) == 2 and f"run dir: {run_dir.resolve()}" in proc.stdout
    assert (run_dir / "policy" / "config.json").exists()


def test_resume_needs_a_run_dir(tmp_path):
    assert_user_error(run_cli("ppo", "--resume", cwd=tmp_path), "--run-dir")
