"""GPU smoke test: one script that proves the GPU path on one GPU (80 GB), with no internet.

    python benchmarks/gpu_smoke.py                      # everything (< 8 min on one H100)
    python benchmarks/gpu_smoke.py --cpu-parts          # assets, plan, environment report only
    python benchmarks/gpu_smoke.py --cpu-parts --tiny   # the same on a tiny model (seconds)

Assets: a byte-level BPE tokenizer trained here on the bundled prompts, and a random
Llama-3.2-1B-shaped bf16 model (16 layers, hidden 2048, 32/8 heads, vocabulary 128256) saved
with ``save_pretrained``: nothing is downloaded. Steps:

1. environment: torch, CUDA, NCCL, bf16, DeepSpeed's accelerator, vLLM;
2. ``rlhf-ray plan`` of the smoke run (one node, one 80 GB GPU);
3. one NCCL learner: a ZeRO-3 bf16 policy rank on the GPU (``zero.Init`` from the checkpoint)
   trains one PPO step on a synthetic batch;
4. generation of 8, 64 and 256 rows on each installed rollout backend;
5. 4 PPO rounds, every role sharing the GPU by fractions, ZeRO-3, bf16, gradient checkpointing;
6. save (a checkpoint every 2 rounds) and resume for 2 more rounds.

Output: one JSON line (the last line of stdout): round and phase times, rollout tokens/s, sync
GB/s, the sync probe's log-prob difference, skipped steps, and each role's peak GPU memory
(torch's reserved peak) against ``plan``'s estimate. A step that fails is recorded with its
error and the script goes on; the exit status is 1 if any step failed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

# Llama-3.2-1B's shape (its published config.json, as rlhf_ray/models/memory.py KNOWN_CONFIGS)
LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    vocab_size=128256,
    rope_theta=500000.0,
    tie_word_embeddings=True,
)
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=512,
    tie_word_embeddings=True,
)
GEN_ROWS = (8, 64, 256)
GB = 1e9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "rlhf-gpu-smoke")
    p.add_argument("--cpu-parts", action="store_true", help="assets, plan, environment only")
    p.add_argument("--tiny", action="store_true", help="a tiny Llama instead of the 1B shape")
    p.add_argument("--rounds", type=int, default=4, help="PPO rounds before the resume")
    return p.parse_args(argv)


# -- assets -----------------------------------------------------------------------------------


def build_assets(directory: Path, tiny: bool) -> dict[str, Any]:
    """The tokenizer and the random bf16 model, saved in ``directory`` (kept between runs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    from rlhf_ray.data.prompts import load_prompts
    from rlhf_ray.data.tokenization import EOS_TOKEN, HFTokenizer

    started = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    shape = TINY if tiny else LLAMA_1B
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400 if tiny else 2000,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(load_prompts() * 4, trainer)
    backend.add_special_tokens([EOS_TOKEN])
    tok = HFTokenizer(PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN))
    tok.save(directory)
    if not (directory / "model.safetensors").exists():
        bos = tok.bos_id if tok.bos_id is not None else tok.eos_id
        config = LlamaConfig(
            **shape,
            max_position_embeddings=2048,
            pad_token_id=tok.pad_id,
            eos_token_id=tok.eos_id,
            bos_token_id=bos,
        )
        device = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU inits 1B in a second
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(str(directory))
        del model
    params = sum(
        (directory / f).stat().st_size for f in os.listdir(directory) if f.endswith(".safetensors")
    )
    return {
        "dir": str(directory),
        "tokenizer_vocab": tok.vocab_size,
        "shape": shape,
        "weights_gb": params / GB,
        "seconds": time.perf_counter() - started,
    }


def smoke_config(model_dir: Path, rounds: int):
    """The smoke run: every role on the one GPU by fractions (0.35 + 0.35 + 0.15 + 0.15).

    Two 1.2B learners fit 28 GB each with ZeRO sub-groups and live parameters of 1e8 elements:
    DeepSpeed's 1e9 would step the whole model's fp32 gradient at once (~12 GB more)."""
    from rlhf_ray.config.ppo import load_config

    learner = [
        "model.dtype=bfloat16",
        "num_ranks=1",
        "zero_stage=3",
        "num_cpus_per_rank=2",
        "gradient_checkpointing=true",
        f"model.path={model_dir}",
        "zero_buckets.sub_group=100000000",
        "zero_buckets.max_live=100000000",
    ]
    return load_config(
        None,
        [
            "tokenizer.kind=hf",
            f"tokenizer.name_or_path={model_dir}",
            *(f"policy.{o}" for o in learner),
            "policy.num_gpus_per_rank=0.35",
            *(f"value.{o}" for o in learner),
            "value.num_gpus_per_rank=0.35",
            "reference.num_gpus=0.15",
            "reference.num_cpus=1",
            "reward.function=rlhf_ray.rewards:lowercase_fraction",
            "reward.num_cpus=1",
            "rollout.num_workers=1",
            "rollout.num_gpus_per_worker=0.15",
            "rollout.num_cpus_per_worker=1",
            "rollout.batch_size=64",
            "rollout.max_new_tokens=64",
            "data.max_prompt_tokens=64",
            "ppo.minibatch_size=32",
            "ppo.micro_batch_size=8",
            f"train.rounds={rounds}",
            "checkpoint.every=2",
            "logging.progress=false",
            "cluster.nodes=[{cpus: 16, gpus: 1, gpu_memory_gb: 80}]",
        ],
    )


# -- steps 1 and 2: environment, plan ---------------------------------------------------------


def environment() -> dict[str, Any]:
    import importlib.util

    import deepspeed

    env: dict[str, Any] = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "deepspeed": deepspeed.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_memory_gb"] = torch.cuda.get_device_properties(0).total_memory / GB
        env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        env["bf16"] = torch.cuda.is_bf16_supported()
        env["nccl_available"] = torch.distributed.is_nccl_available()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    from deepspeed.accelerator import get_accelerator

    env["deepspeed_accelerator"] = get_accelerator().device_name()
    env["vllm"] = None
    if importlib.util.find_spec("vllm") is not None:
        import vllm

        env["vllm"] = vllm.__version__
    return env


def plan(cfg) -> dict[str, Any]:
    """``rlhf-ray plan``'s table and verdict, and each role's estimate in GB."""
    from rlhf_ray.distributed.plan import check_plan
    from rlhf_ray.models.memory import role_memory

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = check_plan(cfg)
    estimate = {
        role: round(e.total / GB, 2)
        for role, e in role_memory(cfg).items()
        if not isinstance(e, str) and e.parts
    }
    return {
        "fits": status == 0,
        "estimate_gb": estimate,
        "table": out.getvalue(),
        "problems": err.getvalue().strip(),
    }


# -- steps 3 to 6: on the GPU -----------------------------------------------------------------


def synthetic_batch(cfg, vocab: int):
    from rlhf_ray.types import PPOBatch

    g = torch.Generator().manual_seed(0)
    rows, prompt, response = cfg.ppo.minibatch_size, 64, 64
    ids = torch.randint(3, vocab, (rows, prompt + response), generator=g)
    return PPOBatch(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        response_mask=torch.ones(rows, response, dtype=torch.long),
        old_logprobs=-torch.rand(rows, response, generator=g) - 5,
        old_values=torch.zeros(rows, response),
        advantages=torch.randn(rows, response, generator=g),
        returns=torch.zeros(rows, response),
        ref_logprobs=-torch.rand(rows, response) - 5,
        prompt_len=prompt,
    )


def nccl_learner(cfg, vocab: int) -> dict[str, Any]:
    """One ZeRO-3 bf16 policy rank on the whole GPU, joined over NCCL, one PPO step."""
    import ray

    from rlhf_ray.config.ppo import policy_tokenizer
    from rlhf_ray.distributed.learner_group import LearnerGroup
    from rlhf_ray.workers.learners import PolicyLearner

    role = cfg.policy.model_copy(update={"num_gpus_per_rank": 1.0})
    started = time.perf_counter()
    group = LearnerGroup(
        "policy",
        PolicyLearner,
        role,
        600,
        600,
        policy_cfg=role,
        ppo_cfg=cfg.ppo,
        tokenizer_cfg=policy_tokenizer(cfg),
        temperature=1.0,
        total_steps=10,
    )
    try:
        held = ray.get(group.start())
        setup_s = time.perf_counter() - started
        step = time.perf_counter()
        stats = ray.get(group.call("train", synthetic_batch(cfg, vocab), 0))[0]
        return {
            "backend": "nccl",
            "params_held": held[0],
            "setup_s": setup_s,
            "step_s": time.perf_counter() - step,
            "loss": stats.get("policy_loss"),
            "peak_gpu_gb": _peaks(group.handles)["policy-0"],
        }
    finally:
        group.kill()


def generation(cfg) -> dict[str, Any]:
    """Rows of the bundled prompts sampled on each installed backend, in this process."""
    from rlhf_ray.config.ppo import policy_tokenizer
    from rlhf_ray.data.prompts import load_prompts
    from rlhf_ray.data.tokenization import build_tokenizer
    from rlhf_ray.ppo.loop import tokenize_prompts
    from rlhf_ray.workers.rollout import RolloutGenerator

    tok_cfg = policy_tokenizer(cfg)
    tokenizer = build_tokenizer(tok_cfg)
    prompts = load_prompts()
    out: dict[str, Any] = {}
    backends = {"hf": lambda: RolloutGenerator(cfg.policy.model, tok_cfg, cfg.rollout)}
    vllm_rollout = _vllm_rollout(cfg)
    if vllm_rollout is not None:
        make, rollout_cfg = vllm_rollout
        backends["vllm"] = lambda: make(cfg.policy.model, tok_cfg, rollout_cfg)
    else:
        out["vllm"] = "skipped: vLLM or the project's vLLM rollout backend is not installed"
    batches = {}
    for rows in GEN_ROWS:
        index = [i % len(prompts) for i in range(rows)]
        batches[rows], _ = tokenize_prompts(tokenizer, prompts, index, cfg.data.max_prompt_tokens)
    for name, make in backends.items():
        try:  # one backend failing leaves the other's figures
            out[name] = _generate_rows(make(), batches)
        except Exception as exc:
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc()
        torch.cuda.empty_cache()
    return out


def _generate_rows(generator: Any, batches: dict[int, Any]) -> dict[int, dict[str, float]]:
    per_rows = {}
    for rows, batch in batches.items():
        torch.cuda.synchronize()
        started = time.perf_counter()
        rollout = generator.generate(batch, 0, generator.version)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        tokens = int(rollout.response_mask.sum())
        per_rows[rows] = {"seconds": seconds, "tokens_per_s": tokens / seconds}
    return per_rows


def _vllm_rollout(cfg) -> tuple[Any, Any] | None:
    """(the generator class, the rollout config) of the vLLM backend, if both the project's
    backend (``rollout.backend``) and vLLM are installed."""
    import importlib.util

    from rlhf_ray.config.ppo import RolloutConfig

    if "backend" not in RolloutConfig.model_fields or importlib.util.find_spec("vllm") is None:
        return None
    from rlhf_ray.workers.vllm_rollout import generator_class  # type: ignore[import-not-found]

    rollout_cfg = cfg.rollout.model_copy(update={"backend": "vllm", "vllm_enforce_eager": False})
    return generator_class(rollout_cfg), rollout_cfg


def _peaks(handles: dict[str, Any]) -> dict[str, float]:
    """Each actor's peak of GPU memory reserved by torch's allocator, in GB."""
    import ray

    def peak(_actor: Any) -> float:
        import torch

        return torch.cuda.max_memory_reserved() / GB if torch.cuda.is_available() else 0.0

    refs = {name: h.__ray_call__.remote(peak) for name, h in handles.items()}
    return {name: round(ray.get(ref), 2) for name, ref in refs.items()}


def ppo_rounds(cfg, run_dir: Path) -> dict[str, Any]:
    """``cfg.train.rounds`` PPO rounds, then a resume for 2 more; figures from metrics.jsonl."""
    from rlhf_ray.config.ppo import policy_tokenizer
    from rlhf_ray.distributed import RayWorkers
    from rlhf_ray.models.memory import ModelShape, read_model_config
    from rlhf_ray.observe.metrics import read_metrics
    from rlhf_ray.ppo.loop import run_ppo

    workers = RayWorkers(cfg)
    try:
        run_ppo(cfg, workers, run_dir)
        handles = {
            **workers.policy.handles,
            **(workers.value.handles if workers.value else {}),
            **workers.scorers,
            **{f"rollout-{i}": h for i, h in enumerate(workers.pool.workers)},
        }
        peaks = _peaks(handles)
    finally:
        workers.close()
    more = cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"rounds": cfg.train.rounds + 2})}
    )
    started = time.perf_counter()
    resumed = RayWorkers(more)
    try:
        run_ppo(more, resumed, run_dir, resume=True)
    finally:
        resumed.close()
    rows = read_metrics(run_dir / "metrics.jsonl")
    config_json, _ = read_model_config(cfg.policy.model, policy_tokenizer(cfg))
    weight_gb = ModelShape.from_config(config_json).num_params() * 2 / GB if config_json else 0
    timed = rows[1 : cfg.train.rounds]  # round 0 pays compilation and warm-up
    phases = sorted({k for r in timed for k in r if k.startswith("time/")})
    return {
        "rounds": [r["round"] for r in rows],
        "round_s": statistics.median(r["time/round"] for r in timed),
        "phase_s": {k: round(statistics.median(r[k] for r in timed), 3) for k in phases},
        "rollout_tokens_per_s": statistics.median(r["rollout/tokens_per_s"] for r in timed),
        "sync_gb_per_s": weight_gb / statistics.median(r["time/sync"] for r in timed),
        "sync_probe_diff": max(r["sync/logprob_max_abs_diff"] for r in rows),
        "skipped_steps": sum(r.get("ppo/skipped_steps", 0) for r in rows),
        "peak_gpu_gb": peaks,
        "resume_s": time.perf_counter() - started,
        "resumed_rounds": [r["round"] for r in rows if r["round"] >= cfg.train.rounds],
    }


def _step(results: dict[str, Any], name: str, fn, *args) -> Any:
    started = time.perf_counter()
    try:
        results[name] = fn(*args)
    except Exception as exc:  # a failed step is reported, and the next ones still run
        results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        traceback.print_exc()
    print(f"[gpu_smoke] {name}: {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)
    return results[name]


def _on_gpu(results: dict[str, Any], cfg, out: Path, vocab: int) -> None:
    import ray

    _step(results, "generation", generation, cfg)
    temp_dir = tempfile.mkdtemp(prefix="rg-", dir="/tmp")  # socket paths must stay short
    ray.init(
        address="local",
        num_cpus=16,
        num_gpus=1,
        include_dashboard=False,
        _temp_dir=temp_dir,
        namespace="rlhf_ray",
        logging_level="WARNING",
    )
    try:
        _step(results, "nccl_learner", nccl_learner, cfg, vocab)
        run_dir = out / "run"
        shutil.rmtree(run_dir, ignore_errors=True)
        ppo = _step(results, "ppo", ppo_rounds, cfg, run_dir)
        estimate = results["plan"].get("estimate_gb", {}) if "plan" in results else {}
        if "peak_gpu_gb" in ppo:
            ppo["peak_vs_plan_gb"] = {
                name: [peak, estimate.get(name.rsplit("-", 1)[0])]
                for name, peak in ppo["peak_gpu_gb"].items()
            }
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    results: dict[str, Any] = {"mode": "cpu-parts" if args.cpu_parts else "gpu"}
    assets = _step(results, "assets", build_assets, args.out / "model", args.tiny)
    _step(results, "environment", environment)
    cfg = smoke_config(args.out / "model", args.rounds)
    _step(results, "plan", plan, cfg)
    if not args.cpu_parts:
        if not torch.cuda.is_available():
            results["gpu_steps"] = {"error": "no CUDA GPU visible: run with --cpu-parts"}
        else:
            _on_gpu(results, cfg, args.out, assets.get("tokenizer_vocab", 256))
    results["total_s"] = round(time.perf_counter() - started, 1)
    failed = [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
    results["failed_steps"] = failed
    print(json.dumps(results, default=str), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
