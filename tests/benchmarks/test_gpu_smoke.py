"""benchmarks/gpu_smoke.py's CPU-only parts (assets, plan, environment report) run anywhere
and print one JSON line; the GPU steps are left to a GPU machine."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_cpu_parts_build_assets_plan_and_report(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "gpu_smoke.py"),
            "--cpu-parts",
            "--tiny",
            "--out",
            str(tmp_path),
        ],
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
    assert "ppo" not in report  # no GPU steps with --cpu-parts
