"""benchmarks/gpu_smoke.py's CPU-only parts (assets, plan, environment report, HF generation on
the CPU) run anywhere and print one JSON line; the GPU parts are left to a GPU machine. A part
that fails at any depth fails the script, and the disk check refuses a checkpoint that would
not fit."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections import namedtuple

import pytest
from conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_smoke.py"


@pytest.fixture(scope="module")
def smoke():
    spec = importlib.util.spec_from_file_location("gpu_smoke", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_parts_build_assets_plan_and_report(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-parts", "--tiny", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["failed_steps"] == []
    model = tmp_path / "model"
    assert (model / "config.json").is_file() and (model / "tokenizer.json").is_file()
    assert list(model.glob("*.safetensors"))
    env = report["environment"]
    assert env["torch"] and env["deepspeed_accelerator"] in ("cpu", "cuda")
    plan = report["plan"]
    assert plan["fits"], plan["problems"]
    assert {"policy", "value", "reference", "rollout"} <= set(plan["estimate_gb"])
    assert "policy" in plan["table"]
    assert report["generation"]["hf"]["8"]["tokens_per_s"] > 0  # sampled on the CPU
    assert "ppo_hf" not in report  # no GPU parts with --cpu-parts
    sync = report["sync_transports"]  # the GPU part's code, on CPUs
    assert sync["object_store"]["s_per_gb"] > 0 and sync["collective_cpu"]["s_per_gb"] > 0
    assert sync["collective_cpu"]["backend"] == "gloo" and "skipped" in sync["nccl"]


def test_a_failed_generation_fails_the_script(smoke, tmp_path, monkeypatch, capsys):
    def broken(generator, batches):
        raise RuntimeError("CUDA error: an illegal memory access")

    monkeypatch.setattr(smoke, "_generate_rows", broken)
    monkeypatch.setattr(smoke, "sync_transports", lambda *args: {})  # no Ray in this process
    assert smoke.main(["--cpu-parts", "--tiny", "--out", str(tmp_path)]) == 1
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["failed_steps"] == ["generation.hf"]
    assert "illegal memory access" in report["generation"]["hf"]["error"]


def test_failed_parts_are_found_at_any_depth(smoke):
    report = {"assets": {"dir": "x"}, "ppo_vllm": {"rounds": [0]}, "generation": {
        "hf": {8: {"tokens_per_s": 1.0}}, "vllm": {"error": "vLLM is not installed"}}}  # fmt: skip
    assert smoke.failed_parts(report) == ["generation.vllm"]
    assert smoke.failed_parts({"gpu_steps": {"error": "no GPU"}}) == ["gpu_steps"]
    assert smoke.failed_parts({"a": {"b": 1}}) == []


def test_the_disk_check_refuses_a_checkpoint_that_would_not_fit(smoke, tmp_path, monkeypatch):
    # two 1.24e9-parameter learners: (2 HF + 2 bf16 + 12 fp32 master and Adam) bytes each
    need = smoke.checkpoint_bytes(1_240_000_000, 2)
    assert need == 1_240_000_000 * 2 * 16  # 39.7 GB
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(smoke.shutil, "disk_usage", lambda p: usage(64 * 2**30, 0, 30 * 2**30))
    with pytest.raises(RuntimeError, match=r"32\.2 GB free, a checkpoint needs 39\.7 GB"):
        smoke.check_disk(tmp_path, need)
    monkeypatch.setattr(smoke.shutil, "disk_usage", lambda p: usage(64 * 2**30, 0, 60 * 2**30))
    smoke.check_disk(tmp_path, need)  # 64.4 GB free: fits with the margin
