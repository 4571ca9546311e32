"""Stage checkpoints: ``sft`` and ``train-rm`` SIGKILLed after their first checkpoint, then run
again with ``--resume``, end with the weights of an uninterrupted run; a lost stage learner is
recovered from the newest checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf_ray.cli import main
from rlhf_ray.config.stages import load_sft_config
from rlhf_ray.errors import UserError
from rlhf_ray.observe.metrics import read_metrics
from rlhf_ray.stages import run_sft, sft_role
from rlhf_ray.stages.checkpoint import complete_checkpoints, run_stage_recovering
from rlhf_ray.workers.inprocess import InProcessStage
from rlhf_ray.workers.interface import LearnerLostError

SMALL = ["--in-process", "learner.engine=torch", "learner.num_ranks=1", "train.epochs=1",
         "train.batch_size=48", "data.max_tokens=32", "data.max_prompt_tokens=24",
         "checkpoint.every=2", "checkpoint.keep_last=2", "logging.progress=false"]  # fmt: skip
OUTPUT = {"sft": "model", "train-rm": "reward_model"}


def _weights(run_dir: Path, command: str) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / OUTPUT[command] / "model.safetensors"))


def _kill_after_first_checkpoint(command: str, run_dir: Path) -> None:
    """Run the stage as a user would and SIGKILL it once its first checkpoint is complete."""
    # the torch threads of this process, which makes the uninterrupted and the resumed parts:
    # another count sums in another order (float differences above 1e-6 by the end)
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    args = [sys.executable, "-m", "rlhf_ray.cli", command, "--run-dir", str(run_dir), *SMALL]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not complete_checkpoints(run_dir) and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (run_dir / OUTPUT[command]).exists()  # killed mid-run


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The uninterrupted run of each stage, made once."""
    runs: dict[str, Path] = {}

    def run(command: str) -> Path:
        if command not in runs:
            runs[command] = tmp_path_factory.mktemp(command) / "whole"
            assert main([command, "--run-dir", str(runs[command]), *SMALL]) == 0
        return runs[command]

    return run


@pytest.mark.parametrize("command", ["sft", "train-rm"])
def test_a_killed_stage_resumes_to_the_uninterrupted_weights(
    command, uninterrupted, tmp_path, capsys
):
    whole, killed = uninterrupted(command), tmp_path / "killed"
    _kill_after_first_checkpoint(command, killed)
    assert main([command, "--run-dir", str(killed), "--resume", *SMALL]) == 0
    assert "resumed from" in capsys.readouterr().out
    want, got = _weights(whole, command), _weights(killed, command)
    assert want.keys() == got.keys()
    assert max(float((want[k] - got[k]).abs().max()) for k in want) <= 1e-6
    # the resumed log has every step once, as the uninterrupted one
    steps = [r["step"] for r in read_metrics(killed / "metrics.jsonl") if "train/loss" in r]
    assert steps == [r["step"] for r in read_metrics(whole / "metrics.jsonl") if "train/loss" in r]
    assert [p.name for p in complete_checkpoints(killed)] == ["step_000002", "step_000004"]


class LoseOnce(InProcessStage):
    """An in-process stage whose learner is 'lost' once, at step 4 (a killed rank)."""

    lost = False

    def train_step(self, epoch: int, step: int) -> dict[str, float]:
        if epoch == 0 and step == 3 and not LoseOnce.lost:
            LoseOnce.lost = True
            raise LearnerLostError("learner sft-0 died during train_step")
        return super().train_step(epoch, step)

    def restart(self) -> None:  # a fresh learner: the checkpoint gives it its state back
        self.__init__(self.role, 600)

    def __init__(self, role, timeout):
        self.role = role
        super().__init__(role, timeout)


def test_a_lost_stage_learner_is_recovered_from_the_newest_checkpoint(
    uninterrupted, tmp_path, capsys
):
    cfg = load_sft_config(None, SMALL[1:])
    whole = uninterrupted("sft")
    workers = LoseOnce(sft_role(cfg), 600)
    done = run_stage_recovering(run_sft, cfg, workers, tmp_path / "lost", False)
    assert "restarting the learners from" in capsys.readouterr().out
    assert LoseOnce.lost
    want, got = _weights(whole, "sft"), _weights(done.run_dir, "sft")
    assert max(float((want[k] - got[k]).abs().max()) for k in want) <= 1e-6
    no_checkpoints = load_sft_config(None, [*SMALL[1:], "checkpoint.every=0"])
    LoseOnce.lost = False
    with pytest.raises(UserError, match="no complete checkpoint"):
        run_stage_recovering(run_sft, no_checkpoints, LoseOnce(sft_role(cfg), 600),
                             tmp_path / "none", False)  # fmt: skip
