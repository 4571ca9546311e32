"""VLLMRolloutGenerator: the rollout worker of ``rollout.backend: vllm``.

Same contract as ``workers.rollout.RolloutGenerator`` (token ids in, a ``Rollout`` out,
versioned weights, the sync probe, ping), sampling with a vLLM engine
(``engines.vllm_engine``). ``generator_class`` picks the class for a rollout config.

Weights: the buckets of a version are collected as they arrive; the last one completes the
version, which then goes into the engine in one in-place ``reload_weights``. vLLM's layer-wise
reload processes a layer once all its tensors arrived, and a bucket boundary may split a layer,
so the worker holds at most one extra copy of the weights (host memory) during a sync: the
collected tensors, handed to the in-process engine by reference (no serialized copy). Tied
tensors (e.g. GPT-2's ``lm_head.weight``, sent once as ``transformer.wte.weight``) are sent to
vLLM under every name the checkpoint has, as the same tensor.

Start-up: the engine reads its model from a temp dir, removed as soon as the engine has
started (a worker stopped by ``ray.kill`` runs no destructor). A worker whose weights come by
sync writes only ``config.json`` there and starts vLLM on dummy weights.

A LoRA policy (syncs send the adapters alone): where vLLM serves LoRA on the architecture
(``engines.vllm_lora.serves_lora``: Llama-like models, not GPT-2), the engine starts on the
policy's base (read from ``model_spec`` like the HF worker's) and each version's adapters are
a vLLM LoRA adapter of their own, named by version; generate, greedy and the sync probe name
the version the worker holds. Elsewhere the worker keeps the peft model on the CPU, loads the
adapters into it and reloads the merged weights in place, like a full-weight sync (one more
copy of the model in the worker).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from typing import Any

import torch

from rlhf_ray.config.roles import trains_lora
from rlhf_ray.data.tokenization import build_tokenizer
from rlhf_ray.engines.vllm_engine import VLLMSampler
from rlhf_ray.engines.vllm_lora import AdapterVersions, serves_lora
from rlhf_ray.errors import UserError
from rlhf_ray.models import build_causal_lm, state_dict_from_numpy
from rlhf_ray.models.build import build_policy_lm, max_positions
from rlhf_ray.models.lora import merged_weights, tied_modules_to_save
from rlhf_ray.models.weights import NumpyWeights, check_known, load_targets, weight_tensors
from rlhf_ray.observe.quiet import quiet_dependencies
from rlhf_ray.types import PromptBatch, Rollout
from rlhf_ray.workers.collective import SyncMember, receive_bucket
from rlhf_ray.workers.interface import (
    StaleWeightsError,
    probe_batch,
    row_seeds,
    sampled_rollout,
)
from rlhf_ray.workers.threads import PhaseThreads, set_threads


def generator_kwargs(cfg: Any) -> dict[str, Any]:
    """Keyword arguments a run (``cfg``: a PPO or eval config) gives its rollout workers
    beyond the model and configs: vLLM's the run's longest sequence, the HF backend none."""
    if getattr(cfg.rollout, "backend", "hf") != "vllm":
        return {}
    return {"max_model_len": cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens}


def load_tensors(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` into ``module``'s tensors of the same names (unknown names raise)."""
    targets = load_targets(module)
    check_known(tensors, targets)
    with torch.no_grad():
        for name, tensor in tensors.items():
            targets[name].copy_(tensor)


def write_start_dir(model: Any, directory: str, dummy: bool) -> None:
    """What the engine starts from: ``model`` saved, or its ``config.json`` alone when
    ``dummy`` (the engine starts on dummy weights; the sync brings the real ones)."""
    if dummy:
        model.config.architectures = [type(model).__name__]  # what vLLM builds
        model.config.save_pretrained(directory)
    else:
        model.save_pretrained(directory)


def generator_class(rollout_cfg: Any) -> type:
    """The rollout worker class of ``rollout_cfg.backend``."""
    if getattr(rollout_cfg, "backend", "hf") == "vllm":
        return VLLMRolloutGenerator
    from rlhf_ray.workers.rollout import RolloutGenerator

    return RolloutGenerator


def tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """``{checkpoint name: name the sync sends}`` for tensors the sync sends once but the
    checkpoint holds under several names (tied weights)."""
    sent = weight_tensors(model)
    by_storage = {t.data_ptr(): name for name, t in sent.items() if t.numel()}
    return {
        name: by_storage[t.data_ptr()]
        for name, t in model.state_dict().items()
        if name not in sent and t.numel() and t.data_ptr() in by_storage
    }


class VLLMRolloutGenerator(PhaseThreads, SyncMember):
    """Holds versioned policy weights in a vLLM engine; refuses to sample with a stale version."""

    def __init__(
        self,
        model_spec,
        tokenizer_cfg,
        rollout_cfg,
        worker_id: int = 0,
        num_threads: int | None = None,
        from_sync: bool = False,
        max_model_len: int | None = None,
        lora=None,
    ):
        """``from_sync``: the weights come by sync (PPO's pool): the engine starts from weights
        built from ``model_spec``'s config alone (no checkpoint read), as the HF worker does.
        ``max_model_len``: the run's longest sequence (``data.max_prompt_tokens +
        rollout.max_new_tokens``; the sync probe's length if longer); None: the model's
        positions. ``lora``: the policy's ``lora`` section; a LoRA policy's worker reads its
        base from ``model_spec`` and the syncs bring the adapters (module docstring)."""
        set_threads(num_threads)
        # before the start-up weights are saved (no "Writing model shards" bar) and the engine
        # starts (no torch.distributed deprecation warning from vLLM's kernel dispatcher)
        quiet_dependencies()
        self.worker_id, self.cfg = worker_id, rollout_cfg
        self.tokenizer = build_tokenizer(tokenizer_cfg)
        self.adapters: AdapterVersions | None = None  # vLLM serves the adapters
        self.lora_model: torch.nn.Module | None = None  # the adapters are merged here
        peft_config, model = None, None
        if from_sync and trains_lora(lora, model_spec):
            model, peft_config = self._lora_start(model_spec, lora)
        if model is None:
            model = build_causal_lm(model_spec, self.tokenizer, "cpu", weights=not from_sync)
        dummy = from_sync and peft_config is None  # else the engine starts on the real base
        self.aliases = tied_aliases(model)
        # the sync probe is scored by this engine too: it must fit beside the run's sequences
        probe = probe_batch(self.tokenizer)[0].shape[1]  # scored with one token sampled
        length = max(max_model_len, probe + 1) if max_model_len else max_positions(model.config)
        weight_bytes = model.num_parameters() * getattr(torch, model_spec.dtype).itemsize
        directory = tempfile.mkdtemp(prefix="rlhf_ray-vllm-")
        try:
            write_start_dir(model, directory, dummy)
            del model
            self.engine = VLLMSampler(
                directory,
                rollout_cfg,
                model_spec.dtype,
                length,
                torch.cuda.is_available(),
                num_threads,
                weight_bytes=weight_bytes,
                dummy_weights=dummy,
                lora_rank=None if peft_config is None else peft_config.r,
            )
        finally:  # the engine holds the weights now: nothing on disk outlives the start
            shutil.rmtree(directory, ignore_errors=True)
        if peft_config is not None:
            self.adapters = AdapterVersions(self.engine, peft_config)
        self.version = -1  # no weights received yet
        self._loading: tuple[int, set[int], dict[str, torch.Tensor]] | None = None
        self.last_reload_tensors = 0

    def _lora_start(self, model_spec, lora) -> tuple[torch.nn.Module | None, Any]:
        """A LoRA policy's worker: ``(plain base to start vLLM on, peft config)`` when vLLM
        serves the adapters, else ``(None, None)`` with the peft model kept here to merge
        into (the engine then starts on dummy weights like a full-weight worker's)."""
        peft_model = build_policy_lm(model_spec, lora, self.tokenizer)
        peft_config = peft_model.peft_config[peft_model.active_adapter]
        architecture = type(peft_model.get_base_model()).__name__
        if serves_lora(architecture, peft_config):
            return peft_model.unload(), peft_config  # the base without its adapters
        tied = tied_modules_to_save(peft_model)
        if tied:
            raise UserError(
                f"lora.modules_to_save {tied} are tied to other weights, which the merged "
                f"weights a vLLM worker reloads for {architecture} cannot keep apart: leave "
                "them out of modules_to_save, or use rollout.backend hf"
            )
        self.lora_model = peft_model
        return None, None

    def load_bucket(self, bucket: NumpyWeights, version: int, index: int, count: int) -> int:
        """Bucket ``index`` of ``count`` of weights ``version``. Until every bucket arrived the
        worker's version is -1 and it refuses to generate; the last one reloads the engine."""
        return self._collect(state_dict_from_numpy(bucket), version, index, count)

    def receive_bucket(self, version: int, index: int, count: int) -> int:
        """``load_bucket`` for a bucket broadcast over the sync group: the received tensors
        are collected as they are (no numpy, no object store) for the engine's reload."""
        return self._collect(receive_bucket(self._sync_group()), version, index, count)

    def _collect(self, tensors: dict[str, torch.Tensor], version: int, index: int, count: int):
        if self._loading is None or self._loading[0] != version:
            self._loading = (version, set(), {})
            self.version = -1
        self._loading[2].update(tensors)
        self._loading[1].add(index)
        if len(self._loading[1]) == count:
            tensors = self._loading[2]
            self._loading = None
            self._reload(tensors, version)
            self.version = version
        return self.version

    def _reload(self, tensors: dict[str, torch.Tensor], version: int) -> None:
        if self.adapters is not None:  # the adapters of ``version``, served by vLLM
            self.last_reload_tensors = self.adapters.load(version, tensors)
            return
        if self.lora_model is not None:  # the adapters, merged into this worker's base
            load_tensors(self.lora_model, tensors)
            tensors = merged_weights(self.lora_model)
        for name, source in self.aliases.items():
            if source in tensors:
                tensors[name] = tensors[source]
        self.last_reload_tensors = self.engine.load(tensors)

    def _adapter(self) -> contextlib.AbstractContextManager[Any]:
        """The ``LoRARequest`` of the version this worker holds, in use until the block ends
        (None without served adapters)."""
        if self.adapters is None:
            return contextlib.nullcontext()
        return self.adapters.use(self.version)

    def generate(self, prompts: PromptBatch, seed: int, expected_version: int) -> Rollout:
        """Sample ``prompts`` in one engine call, row ``i`` seeded by (``seed``, its prompt
        index, its sample index)."""
        if self.version != expected_version:
            raise StaleWeightsError(
                f"rollout worker {self.worker_id} holds weights v{self.version}, "
                f"round needs v{expected_version}"
            )
        with self._adapter() as lora:  # the rollout's one version
            out = self.engine.sample(
                prompts.prompt_ids,
                prompts.prompt_mask,
                row_seeds(seed, prompts.prompt_index, prompts.sample_index),
                self.tokenizer.eos_id,
                self.tokenizer.pad_id,
                lora=lora,
            )
        return sampled_rollout(prompts, out, self.tokenizer, self.version, self.worker_id)

    def greedy(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int
    ) -> torch.Tensor:
        """Greedy continuation ``(B, max_new_tokens)`` (parity checks)."""
        with self._adapter() as lora:
            out = self.engine.sample(
                prompt_ids,
                prompt_mask,
                None,
                self.tokenizer.eos_id,
                self.tokenizer.pad_id,
                max_new_tokens,
                lora=lora,
            )
        return out["response_ids"]

    def probe_logprobs(self) -> torch.Tensor:
        """Log-probs ``(T-1,)`` of the sync probe under the weights the engine holds."""
        ids, _ = probe_batch(self.tokenizer)
        with self._adapter() as lora:  # the sync check sees what sampling sees
            return self.engine.prompt_logprobs(ids[0].tolist(), self.cfg.temperature, lora)

    def ping(self) -> int:
        return self.worker_id
