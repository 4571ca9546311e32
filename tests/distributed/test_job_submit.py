"""The cluster path, end to end: a local head node started by PID (with Ray 2.60's token
authentication made explicit), the CPU debug job and a ``train-rm`` stage submitted with
``ray job submit --working-dir``, their status, logs and run dirs."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import REPO, wait_no_processes_under

from rlhf_ray.cli import main
from rlhf_ray.models import read_score_stats
from rlhf_ray.observe.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.ray]

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:  # 401 without a token: the server is up
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s}s")


@pytest.fixture(scope="module")
def head_node():
    """``ray start --head --block`` in the background, shared by the module's jobs (one at a
    time); ended by its PID."""
    temp_dir = tempfile.mkdtemp(prefix="rr-", dir="/tmp")
    dash = _free_port()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }
    env.pop("RAY_ADDRESS", None)
    log = open(Path(temp_dir) / "head.log", "w")  # noqa: SIM115 (closed in finally)
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={_free_port()}",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            # the job agent's HTTP port defaults to 52365, which any other Ray on this machine
            # (a test's local cluster that is still shutting down) may hold
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_http(f"http://127.0.0.1:{dash}/api/version", 90)
        yield f"http://127.0.0.1:{dash}", env
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        log.close()
        left = wait_no_processes_under(temp_dir)
        assert not left, f"head node processes outlived the test: {[p.pid for p in left]}"
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray(args: list[str], env: dict, timeout: int = 60) -> subprocess.CompletedProcess:
    """Run the ``ray`` CLI. A submission the head refuses because its job agent is not up yet
    (it starts a few seconds after the dashboard answers) is tried again, for up to a minute."""
    deadline = time.monotonic() + 60
    while True:
        done = subprocess.run(
            [str(BIN / "ray"), *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if "No available agent" not in done.stderr or time.monotonic() > deadline:
            return done
        time.sleep(2)


def test_cpu_debug_job_through_ray_job_submit(head_node, tmp_path):
    address, env = head_node
    run_dir = tmp_path / "run"
    job = "rlhf-ray-debug-test"
    submit = _ray(
        [
            "job",
            "submit",
            "--address",
            address,
            "--submission-id",
            job,
            "--working-dir",
            str(REPO),
            "--runtime-env",
            "jobs/runtime_env_cpu.yaml",
            "--",
            "rlhf-ray",
            "ppo",
            "--config",
            "jobs/debug_cpu.yaml",
            "--run-dir",
            str(run_dir),
        ],
        env,
        timeout=900,
    )
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    status = _ray(["job", "status", "--address", address, job], env)
    assert "succeeded" in (status.stdout + status.stderr).lower()
    rounds = yaml.safe_load((REPO / "jobs" / "debug_cpu.yaml").read_text())["train"]["rounds"]
    logs = _ray(["job", "logs", "--address", address, job], env).stdout
    progress = [line for line in logs.splitlines() if line.startswith("round ")]
    assert len(progress) == rounds, logs[-3000:]
    # not a terminal: one plain line per round with the reward, KL, phase times and ETA
    line = re.compile(
        rf"round +(\d+)/{rounds} \| reward [+-]\d\.\d{{4}} \| kl [+-]\d+\.\d{{4}} \| workers 2 "
        r"\| generate [\d.]+s score [\d.]+s advantage [\d.]+s update [\d.]+s sync [\d.]+s "
        r"\| [\d.]+s( \| eta \w+)?$"
    )
    assert [int(line.match(p).group(1)) for p in progress] == list(range(rounds)), progress
    assert all(" | eta " in p for p in progress[1:])
    assert "== ppo finished ==" in logs and f"run dir: {run_dir}" in logs
    assert f"next: rlhf-ray plot {run_dir}" in logs
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert len(rows) == rounds
    assert all(r["sync/logprob_max_abs_diff"] <= 1e-6 for r in rows)  # Ray workers == learners
    assert (run_dir / "policy" / "config.json").exists()
    assert (run_dir / "config.yaml").exists()


def test_train_rm_stage_through_ray_job_submit(head_node, tmp_path):
    address, env = head_node
    run_dir = tmp_path / "rm"
    job = "rlhf-ray-train-rm-test"
    submit = _ray(
        [
            "job", "submit", "--address", address, "--submission-id", job,
            "--working-dir", str(REPO), "--runtime-env", "jobs/runtime_env_cpu.yaml",
            "--", "rlhf-ray", "train-rm", "--config", "jobs/rm_hh.yaml",
            "--run-dir", str(run_dir),
            # the CPU test's share of the bundled sample: 1 epoch of 4 steps
            "train.epochs=1", "train.batch_size=32", "data.eval_fraction=0.5",
            "data.max_tokens=64", "data.max_prompt_tokens=32",
        ],
        env,
        timeout=900,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    status = _ray(["job", "status", "--address", address, job], env)
    assert "succeeded" in (status.stdout + status.stderr).lower()
    logs = _ray(["job", "logs", "--address", address, job], env).stdout
    assert "rm parameters held per rank (rank 0:" in logs and "rank 1:" in logs  # 2 ranks
    assert "== train-rm finished ==" in logs and f"run dir: {run_dir}" in logs
    assert f"next: rlhf-ray plot {run_dir}" in logs
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
    assert "final/eval_accuracy" in rows[-1]
    assert read_score_stats(run_dir / "reward_model") is not None
    assert main(["plot", str(run_dir)]) == 0  # loss and accuracy against steps
    assert {p.name for p in (run_dir / "plots").glob("*.png")} >= {"loss.png", "accuracy.png"}
