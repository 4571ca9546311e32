"""GPU tier (only on a lent GPU machine: ``python -m pytest -m gpu``): the GPU path itself.

bf16 weights, a Llama-shaped model loaded under ZeRO-3's ``zero.Init``, learners joined over
NCCL (whose collectives take no CPU tensor), each actor's accelerator, the sync check in bf16,
and the vLLM rollout backend when it is installed. One Ray cluster and one model for the module.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from rlhf_ray.config.ppo import RolloutConfig, load_config
from tests.helpers.model_dirs import bpe_tokenizer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A small Llama (4 layers, hidden 256, GQA 8/4 heads) in bf16 with its own tokenizer."""
    directory = tmp_path_factory.mktemp("llama")
    tok = bpe_tokenizer(directory)
    config = LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=tok.pad_id,
        eos_token_id=tok.eos_id,
        bos_token_id=tok.eos_id,
    )
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def gpu_ray():
    import ray

    temp_dir = tempfile.mkdtemp(prefix="rg-", dir="/tmp")
    ray.init(
        address="local",
        num_cpus=8,
        num_gpus=1,
        namespace="rlhf_ray",
        include_dashboard=False,
        _temp_dir=temp_dir,
        logging_level="WARNING",
    )
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def gpu_run(llama_dir, *overrides: str):
    """Every role on the one GPU by fractions; ZeRO-3, bf16, gradient checkpointing."""
    learner = [
        "model.dtype=bfloat16",
        "num_ranks=1",
        "zero_stage=3",
        "num_cpus_per_rank=1",
        "gradient_checkpointing=true",
        f"model.path={llama_dir}",
    ]
    return load_config(
        None,
        [
            "tokenizer.kind=hf",
            f"tokenizer.name_or_path={llama_dir}",
            *(f"policy.{o}" for o in learner),
            "policy.num_gpus_per_rank=0.3",
            *(f"value.{o}" for o in learner),
            "value.num_gpus_per_rank=0.3",
            "reference.num_gpus=0.1",
            "reward.function=rlhf_ray.rewards:lowercase_fraction",
            "rollout.num_workers=1",
            "rollout.num_gpus_per_worker=0.2",
            "rollout.batch_size=16",
            "rollout.max_new_tokens=16",
            "ppo.minibatch_size=8",
            "train.rounds=2",
            "logging.progress=false",
            *overrides,
        ],
    )


def test_each_actor_runs_on_the_accelerator_ray_gave_it(gpu_ray):
    import ray

    from rlhf_ray.distributed.actors import spawn_actor

    class Probe:
        def __init__(self, num_threads: int | None = None):
            pass

        def report(self) -> tuple[str, str, str]:
            from deepspeed.accelerator import get_accelerator

            from rlhf_ray.accelerator import default_device

            return (
                os.environ["DS_ACCELERATOR"],
                str(default_device()),
                get_accelerator().device_name(),
            )

    on_gpu = spawn_actor(Probe, "probe-gpu", 0.5, 0.1)
    on_cpu = spawn_actor(Probe, "probe-cpu", 0.5, 0)
    try:
        assert ray.get(on_gpu.report.remote()) == ("cuda", "cuda:0", "cuda")
        assert ray.get(on_cpu.report.remote()) == ("cpu", "cpu", "cpu")
    finally:
        ray.kill(on_gpu)
        ray.kill(on_cpu)


def test_bf16_llama_zero3_rounds_on_one_gpu(gpu_ray, llama_dir, tmp_path):
    import ray

    from rlhf_ray.distributed import RayWorkers
    from rlhf_ray.observe.metrics import read_metrics
    from rlhf_ray.ppo.loop import run_ppo

    cfg = gpu_run(llama_dir)
    workers = RayWorkers(cfg)
    try:
        # loaded under zero.Init: the rank holds partitions (ds_tensor), not plain tensors
        partitioned = workers.policy.actors[0].__ray_call__.remote(
            lambda rank: all(hasattr(p, "ds_tensor") for p in rank.module.parameters())
        )
        assert ray.get(partitioned)
        run_ppo(cfg, workers, tmp_path / "run")  # NCCL collectives every micro-batch
    finally:
        workers.close()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 2
    diff = max(r["sync/logprob_max_abs_diff"] for r in rows)
    print(f"bf16 sync probe max |diff| {diff:.4f} (threshold {cfg.sync.tolerance('bfloat16')})")
    assert diff <= cfg.sync.tolerance("bfloat16")
    assert all(torch.isfinite(torch.tensor(r["ppo/policy_loss"])) for r in rows)


def test_vllm_rollout_backend_when_installed(gpu_ray, llama_dir, tmp_path):
    pytest.importorskip("vllm")
    if "backend" not in RolloutConfig.model_fields:
        pytest.skip("vLLM is installed but this build has no rollout.backend setting")
    from rlhf_ray.distributed import RayWorkers
    from rlhf_ray.observe.metrics import read_metrics
    from rlhf_ray.ppo.loop import run_ppo

    cfg = gpu_run(llama_dir, "rollout.backend=vllm")
    workers = RayWorkers(cfg)
    try:
        run_ppo(cfg, workers, tmp_path / "run")
    finally:
        workers.close()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 2
    assert max(r["sync/logprob_max_abs_diff"] for r in rows) <= cfg.sync.tolerance("bfloat16")


def test_a_vllm_reload_with_cuda_graphs_on_is_what_the_graphs_replay():
    """``rollout.vllm_enforce_eager=false`` (CUDA graphs, the GPU advice): after each in-place
    reload the engine scores the probe with the NEW weights, as the learner does. A reload that
    reallocated a tensor would leave the graphs replaying the old ones (an O(1) difference)."""
    pytest.importorskip("vllm")
    from rlhf_ray.config.ppo import TokenizerConfig
    from rlhf_ray.data.tokenization import build_tokenizer
    from rlhf_ray.models import build_causal_lm, response_logprobs
    from rlhf_ray.models.weights import state_dict_to_numpy, weight_tensors
    from rlhf_ray.workers.interface import probe_batch
    from rlhf_ray.workers.vllm_rollout import VLLMRolloutGenerator

    cfg = load_config(None, ["rollout.backend=vllm", "rollout.vllm_enforce_eager=false"])
    tok = build_tokenizer(TokenizerConfig())
    worker = VLLMRolloutGenerator(
        cfg.policy.model, TokenizerConfig(), cfg.rollout, from_sync=True, max_model_len=128
    )
    ids, mask = probe_batch(tok)
    for version, seed in enumerate((7, 8)):
        trained = build_causal_lm(cfg.policy.model.model_copy(update={"init_seed": seed}), tok)
        worker.load_bucket(state_dict_to_numpy(weight_tensors(trained)), version, 0, 1)
        with torch.no_grad():
            learner = response_logprobs(trained, ids, mask, 1, cfg.rollout.temperature)[0][0]
        diff = (worker.probe_logprobs() - learner).abs().max().item()
        print(f"version {version}: probe |vLLM (CUDA graphs) - learner| max {diff:.2e}")
        assert diff < 1e-2
