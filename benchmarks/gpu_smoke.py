"""GPU smoke test: one script that proves the GPU path on one H100 (78 GiB, 16 cores, 64 GiB
disk) within one device command (target: 8 minutes), with no internet.

    python benchmarks/gpu_smoke.py                      # everything
    python benchmarks/gpu_smoke.py --cpu-parts          # assets, plan, env, HF generation on CPU
    python benchmarks/gpu_smoke.py --cpu-parts --tiny   # the same on a tiny model (seconds)

Assets: a byte-level BPE tokenizer trained here on the bundled prompts, and a random
Llama-3.2-1B-shaped bf16 model (16 layers, hidden 2048, 32/8 heads, vocabulary 128256) saved
with ``save_pretrained``: nothing is downloaded. Parts:

1. environment: torch, CUDA, NCCL, bf16, DeepSpeed's accelerator, vLLM (required on a GPU run);
2. ``rlhf-ray plan`` of the smoke run (one node, one GPU);
3. generation of 8, 64 and 256 rows on each rollout backend (HF, vLLM with CUDA graphs);
4. with more than one GPU: a 2-rank NCCL ZeRO-3 policy group trains one PPO step;
5. PPO on the HF backend, every role sharing the GPU by fractions, ZeRO-3, bf16, gradient
   checkpointing: ``--rounds`` rounds, ONE checkpoint at the end (``keep_last=1``; free disk
   is checked first: one checkpoint of two 1.2B ZeRO-3 learners is ~40 GB), then a resume for
   one more round (which writes none);
6. PPO on the vLLM backend for 2 rounds without checkpoints, one rollout worker killed before
   the first sync and replaced;
7. the sync transports on the smoke model (``benchmarks/_transports.py``): the object store and
   the collective group sharing the one GPU (gloo, its shared slot filled from device memory),
   and with more than one GPU the NCCL group of whole GPUs, in s/GB against the published
   0.011-0.019 s/GB floor of a GPU-direct broadcast. NCCL refuses two ranks of one group on one
   GPU, so a one-GPU machine has no NCCL row (``sync_transports.nccl.skipped`` says so).

Output: one JSON line (the last line of stdout): tokens/s per backend, seconds per phase, sync
seconds per GB, the bf16 sync probe's log-prob difference, and each role's peak GPU memory
(torch's reserved peak) against ``plan``'s estimate. A part that fails is recorded with its
error and the script goes on; the exit status is 1 if any part failed, at any depth of the
report (``failed_steps`` names them, e.g. ``generation.vllm``).
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

from rlhf_ray.models.known_configs import KNOWN_CONFIGS

# Llama-3.2-1B's shape: its published config.json, as plan's estimate knows it
LLAMA_1B = {
    **{
        k: v
        for k, v in KNOWN_CONFIGS["meta-llama/Llama-3.2-1B-Instruct"].items()
        if k != "model_type"
    },
    "rope_theta": 500000.0,
}
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
    p.add_argument(
        "--cpu-parts", action="store_true", help="assets, plan, environment, HF generation on CPU"
    )
    p.add_argument("--tiny", action="store_true", help="a tiny Llama instead of the 1B shape")
    p.add_argument("--rounds", type=int, default=3, help="PPO rounds before the resume")
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


def smoke_config(model_dir: Path, rounds: int, backend: str = "hf", checkpoint: bool = True):
    """The smoke run: every role on the one GPU by fractions (0.35 + 0.35 + 0.15 + 0.15; two
    vLLM workers of 0.07). With ``checkpoint``, one checkpoint after the last round.

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
            f"rollout.backend={backend}",
            "rollout.vllm_enforce_eager=false",  # CUDA graphs: the in-place reload must hold
            "rollout.num_workers=2" if backend == "vllm" else "rollout.num_workers=1",
            "rollout.num_gpus_per_worker=0.07"
            if backend == "vllm"
            else "rollout.num_gpus_per_worker=0.15",
            "rollout.num_cpus_per_worker=1",
            "rollout.batch_size=64",
            "rollout.max_new_tokens=64",
            "data.max_prompt_tokens=64",
            "ppo.minibatch_size=32",
            "ppo.micro_batch_size=8",
            f"train.rounds={rounds}",
            f"checkpoint.every={rounds if checkpoint else 0}",
            "checkpoint.keep_last=1",  # the disk holds one checkpoint of the smoke run
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
    """A 2-rank ZeRO-3 bf16 policy group, one GPU per rank, joined over NCCL: one PPO step
    (the PPO parts run 1-rank NCCL groups already)."""
    import ray

    from rlhf_ray.config.ppo import policy_tokenizer
    from rlhf_ray.distributed.learner_group import LearnerGroup
    from rlhf_ray.workers.learners import PolicyLearner

    role = cfg.policy.model_copy(update={"num_gpus_per_rank": 1.0, "num_ranks": 2})
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
            "peak_gpu_gb": _peaks(group.handles),
        }
    finally:
        group.kill()


def generation(cfg, rows: tuple[int, ...] = GEN_ROWS, vllm: bool = True) -> dict[str, Any]:
    """Rows of the bundled prompts sampled on the HF backend and (``vllm``, a GPU run) on the
    vLLM backend, in this process; a missing vLLM is then a failure."""
    from rlhf_ray.config.ppo import policy_tokenizer
    from rlhf_ray.data.prompts import load_prompts
    from rlhf_ray.data.tokenization import build_tokenizer
    from rlhf_ray.ppo.batches import tokenize_prompts
    from rlhf_ray.workers.rollout import RolloutGenerator

    tok_cfg = policy_tokenizer(cfg)
    tokenizer = build_tokenizer(tok_cfg)
    prompts = load_prompts()
    out: dict[str, Any] = {}
    backends = {"hf": lambda: RolloutGenerator(cfg.policy.model, tok_cfg, cfg.rollout)}
    vllm_rollout = _vllm_rollout(cfg) if vllm else None
    if vllm_rollout is not None:
        cls, rollout_cfg = vllm_rollout
        longest = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
        backends["vllm"] = lambda: cls(
            cfg.policy.model, tok_cfg, rollout_cfg, max_model_len=longest
        )
    elif vllm:
        out["vllm"] = {"error": "vLLM is not installed: the GPU run needs the vllm extra"}
    batches = {}
    for n in rows:
        index = [i % len(prompts) for i in range(n)]
        batches[n], _ = tokenize_prompts(tokenizer, prompts, index, cfg.data.max_prompt_tokens)
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
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    for rows, batch in batches.items():
        sync()
        started = time.perf_counter()
        rollout = generator.generate(batch, 0, generator.version)
        sync()
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


def checkpoint_bytes(params: int, learners: int) -> int:
    """Disk one PPO checkpoint takes: per learner, its HF directory (bf16, 2 bytes a parameter)
    and its ZeRO state (bf16 weights 2 + fp32 master weights and Adam's two moments 12)."""
    return params * learners * (2 + 2 + 12)


def check_disk(path: Path, need: int, margin: int = 2 * 2**30) -> None:
    """Refuse to start what would write ``need`` bytes where fewer (plus ``margin``) are free."""
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free
    if free < need + margin:
        raise RuntimeError(
            f"{path}: {free / GB:.1f} GB free, a checkpoint needs {need / GB:.1f} GB "
            f"(+{margin / GB:.0f} GB margin): not writing it"
        )


def _run(cfg, run_dir: Path, resume: bool = False, kill_rollout: bool = False) -> dict:
    """One ``run_ppo`` on fresh workers; each actor's GPU peak. ``kill_rollout``: rollout
    worker 0 is killed before the first sync, which replaces it."""
    import ray

    from rlhf_ray.distributed import RayWorkers
    from rlhf_ray.ppo.loop import run_ppo

    workers = RayWorkers(cfg)
    try:
        if kill_rollout:
            ray.kill(workers.pool.workers[0], no_restart=True)
        run_ppo(cfg, workers, run_dir, resume=resume)
        handles = {
            **workers.policy.handles,
            **(workers.value.handles if workers.value else {}),
            **workers.scorers,
            **{f"rollout-{i}": h for i, h in enumerate(workers.pool.workers)},
        }
        return _peaks(handles)
    finally:
        workers.close()


def _figures(rows: list[dict], weight_gb: float) -> dict[str, Any]:
    timed = rows[1:] or rows  # round 0 pays compilation and warm-up
    phases = sorted({k for r in timed for k in r if k.startswith("time/")})
    sync_s = statistics.median(r["time/sync"] for r in timed)
    return {
        "rounds": [r["round"] for r in rows],
        "phase_s": {k: round(statistics.median(r[k] for r in timed), 3) for k in phases},
        "rollout_tokens_per_s": statistics.median(r["rollout/tokens_per_s"] for r in timed),
        "sync_s_per_gb": sync_s / weight_gb if weight_gb else None,
        "sync_probe_diff_bf16": max(r["sync/logprob_max_abs_diff"] for r in rows),
        "skipped_steps": sum(r.get("ppo/skipped_steps", 0) for r in rows),
        "worker_restarts": max(r.get("rollout/worker_restarts", 0) for r in rows),
    }


def ppo_rounds(cfg, run_dir: Path, backend: str) -> dict[str, Any]:
    """PPO on ``backend``. hf: ``cfg.train.rounds`` rounds, one checkpoint, a resume for one
    more round. vllm: 2 rounds, no checkpoint, a rollout worker killed and replaced."""
    from rlhf_ray.config.ppo import policy_tokenizer
    from rlhf_ray.models.memory import ModelShape, read_model_config
    from rlhf_ray.observe.metrics import read_metrics

    config_json, _ = read_model_config(cfg.policy.model, policy_tokenizer(cfg))
    params = ModelShape.from_config(config_json).num_params() if config_json else 0
    out: dict[str, Any] = {}
    if backend == "hf":
        check_disk(run_dir, checkpoint_bytes(params, 2))
        out["peak_gpu_gb"] = _run(cfg, run_dir)
        more = cfg.model_copy(
            update={"train": cfg.train.model_copy(update={"rounds": cfg.train.rounds + 1})}
        )
        started = time.perf_counter()
        _run(more, run_dir, resume=True)
        out["resume_s"] = time.perf_counter() - started
    else:
        out["peak_gpu_gb"] = _run(cfg, run_dir, kill_rollout=True)
    rows = read_metrics(run_dir / "metrics.jsonl")
    out.update(_figures(rows, params * 2 / GB))
    if backend == "hf" and out["rounds"][-1] != cfg.train.rounds:
        out["error"] = f"the resume did not run round {cfg.train.rounds}: {out['rounds']}"
    if backend == "vllm" and out["worker_restarts"] < 1:
        out["error"] = "the killed rollout worker was not replaced"
    return out


NCCL_FLOOR_S_PER_GB = (0.011, 0.019)  # GPU-direct broadcast, published RL weight-sync figures


def sync_transports(cfg, gpus: int, repeats: int = 3) -> dict[str, Any]:
    """s/GB of one worker's sync on the smoke model, per transport (see the module docstring).
    ``gpus`` 0 (``--cpu-parts``): the same on CPUs, in a local Ray of 2 CPUs."""
    import _common  # benchmarks/, on the path when this runs as a script

    from rlhf_ray.config.ppo import policy_tokenizer

    spec, tok_cfg, mb = cfg.policy.model, policy_tokenizer(cfg), cfg.sync.bucket_mb
    share, cpus = (0.3, 2.0) if gpus else (0.0, 0.9)
    shared = "collective_shared_gpu" if gpus else "collective_cpu"
    rows = {"object_store": ("object_store", share), shared: ("collective", share)}
    out: dict[str, Any] = {"floor_s_per_gb": NCCL_FLOOR_S_PER_GB}
    if gpus > 1:
        rows["nccl"] = ("collective", 1.0)
    else:
        why = "one GPU: NCCL refuses two ranks of one group on one GPU" if gpus else "no GPU"
        out["nccl"] = {"skipped": why}
    with contextlib.ExitStack() as stack:
        if not gpus:
            stack.enter_context(_common.local_ray(2))
        for name, (transport, gpu) in rows.items():
            out[name] = _transport_row(spec, tok_cfg, transport, repeats, mb, gpu, cpus)
    return out


def _transport_row(spec, tok_cfg, transport: str, repeats: int, mb: float, gpu: float, cpus):
    """One transport's figures, or its error (the next transport still runs)."""
    import _transports

    try:
        m = _transports.measure(spec, tok_cfg, transport, 1, repeats, mb, gpu, cpus)
    except Exception as exc:
        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {
        "backend": _transports.backend_for(gpu) if transport == "collective" else "",
        "s_per_gb": round(m["seconds"] / m["gb"], 4),
        "mb": round(m["gb"] * 1e3, 1),
        "rank0_host_peak_mb": round(m["rank0_mb"], 1),
        "worker_host_peak_mb": round(m["worker_mb"], 1),
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


def _on_gpu(results: dict[str, Any], args: argparse.Namespace, vocab: int) -> None:
    import ray

    cfg = smoke_config(args.out / "model", args.rounds)
    _step(results, "generation", generation, cfg)
    torch.cuda.empty_cache()
    temp_dir = tempfile.mkdtemp(prefix="rg-", dir="/tmp")  # socket paths must stay short
    gpus = torch.cuda.device_count()
    ray.init(
        address="local",
        num_cpus=16,
        num_gpus=gpus,
        include_dashboard=False,
        _temp_dir=temp_dir,
        namespace="rlhf_ray",
        logging_level="WARNING",
    )
    try:
        if gpus > 1:
            _step(results, "nccl_2_ranks", nccl_learner, cfg, vocab)
        _step(results, "sync_transports", sync_transports, cfg, gpus)
        estimate = results["plan"].get("estimate_gb", {}) if "plan" in results else {}
        for backend in ("hf", "vllm"):
            run_cfg = smoke_config(args.out / "model", args.rounds, backend, backend == "hf")
            run_dir = args.out / f"run-{backend}"
            shutil.rmtree(run_dir, ignore_errors=True)
            ppo = _step(results, f"ppo_{backend}", ppo_rounds, run_cfg, run_dir, backend)
            shutil.rmtree(run_dir, ignore_errors=True)  # the disk holds one run at a time
            if "peak_gpu_gb" in ppo:
                ppo["peak_vs_plan_gb"] = {
                    name: [peak, estimate.get(name.rsplit("-", 1)[0])]
                    for name, peak in ppo["peak_gpu_gb"].items()
                }
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def failed_parts(report: Any, prefix: str = "") -> list[str]:
    """Every part of ``report`` that holds an ``error``, at any depth ("generation.vllm")."""
    if not isinstance(report, dict):
        return []
    if "error" in report:
        return [prefix or "report"]
    found = []
    for key, value in report.items():
        found += failed_parts(value, f"{prefix}.{key}" if prefix else str(key))
    return found


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    results: dict[str, Any] = {"mode": "cpu-parts" if args.cpu_parts else "gpu"}
    assets = _step(results, "assets", build_assets, args.out / "model", args.tiny)
    _step(results, "environment", environment)
    cfg = smoke_config(args.out / "model", args.rounds)
    _step(results, "plan", plan, cfg)
    if args.cpu_parts:  # the HF backend on this machine's CPU, a few rows; the sync transports
        _step(results, "generation", generation, cfg, (8,), False)
        _step(results, "sync_transports", sync_transports, cfg, 0, 1)
    elif not torch.cuda.is_available():
        results["gpu_steps"] = {"error": "no CUDA GPU visible: run with --cpu-parts"}
    else:
        _on_gpu(results, args, assets.get("tokenizer_vocab", 256))
    results["total_s"] = round(time.perf_counter() - started, 1)
    failed = failed_parts(results)
    results["failed_steps"] = failed
    print(json.dumps(results, default=str), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
