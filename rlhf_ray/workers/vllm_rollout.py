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
"""

from __future__ import annotations

import shutil
import tempfile
from typing import Any

import torch

from rlhf_ray.data.tokenization import build_tokenizer
from rlhf_ray.engines.vllm_engine import VLLMSampler
from rlhf_ray.models import build_causal_lm, state_dict_from_numpy
from rlhf_ray.models.build import max_positions
from rlhf_ray.models.weights import NumpyWeights, weight_tensors
from rlhf_ray.observe.quiet import quiet_dependencies
from rlhf_ray.types import PromptBatch, Rollout
from rlhf_ray.workers.collective import SyncGroup, receive_bucket
from rlhf_ray.workers.interface import (
    StaleWeightsError,
    probe_batch,
    row_seeds,
    sampled_rollout,
)


def generator_kwargs(cfg: Any) -> dict[str, Any]:
    """Keyword arguments a run (``cfg``: a PPO or eval config) gives its rollout workers
    beyond the model and configs: vLLM's the run's longest sequence, the HF backend none."""
    if getattr(cfg.rollout, "backend", "hf") != "vllm":
        return {}
    return {"max_model_len": cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens}


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


class VLLMRolloutGenerator:
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
    ):
        """``from_sync``: the weights come by sync (PPO's pool): the engine starts from weights
        built from ``model_spec``'s config alone (no checkpoint read), as the HF worker does.
        ``max_model_len``: the run's longest sequence (``data.max_prompt_tokens +
        rollout.max_new_tokens``; the sync probe's length if longer); None: the model's
        positions."""
        if num_threads:
            torch.set_num_threads(num_threads)
        # before the start-up weights are saved (no "Writing model shards" bar) and the engine
        # starts (no torch.distributed deprecation warning from vLLM's kernel dispatcher)
        quiet_dependencies()
        self.worker_id, self.cfg = worker_id, rollout_cfg
        self.tokenizer = build_tokenizer(tokenizer_cfg)
        model = build_causal_lm(model_spec, self.tokenizer, "cpu", weights=not from_sync)
        self.aliases = tied_aliases(model)
        # the sync probe is scored by this engine too: it must fit beside the run's sequences
        probe = probe_batch(self.tokenizer)[0].shape[1]  # scored with one token sampled
        length = max(max_model_len, probe + 1) if max_model_len else max_positions(model.config)
        weight_bytes = model.num_parameters() * getattr(torch, model_spec.dtype).itemsize
        directory = tempfile.mkdtemp(prefix="rlhf_ray-vllm-")
        try:
            if from_sync:  # the engine starts on dummy weights; the sync brings the real ones
                model.config.architectures = [type(model).__name__]  # what vLLM builds
                model.config.save_pretrained(directory)
            else:
                model.save_pretrained(directory)
            del model
            self.engine = VLLMSampler(
                directory,
                rollout_cfg,
                model_spec.dtype,
                length,
                torch.cuda.is_available(),
                num_threads,
                weight_bytes=weight_bytes,
                dummy_weights=from_sync,
            )
        finally:  # the engine holds the weights now: nothing on disk outlives the start
            shutil.rmtree(directory, ignore_errors=True)
        self.version = -1  # no weights received yet
        self._loading: tuple[int, set[int], dict[str, torch.Tensor]] | None = None
        self.last_reload_tensors = 0

    def load_bucket(self, bucket: NumpyWeights, version: int, index: int, count: int) -> int:
        """Bucket ``index`` of ``count`` of weights ``version``. Until every bucket arrived the
        worker's version is -1 and it refuses to generate; the last one reloads the engine."""
        return self._collect(state_dict_from_numpy(bucket), version, index, count)

    def join_sync_group(self, *args: Any) -> None:
        """Join the weight-sync group (``workers.collective.SyncGroup``'s arguments)."""
        self.sync_group = SyncGroup(*args)

    def receive_bucket(self, version: int, index: int, count: int) -> int:
        """``load_bucket`` for a bucket broadcast over the sync group: the received tensors
        are collected as they are (no numpy, no object store) for the engine's reload."""
        return self._collect(receive_bucket(self.sync_group), version, index, count)

    def _collect(self, tensors: dict[str, torch.Tensor], version: int, index: int, count: int):
        if self._loading is None or self._loading[0] != version:
            self._loading = (version, set(), {})
            self.version = -1
        self._loading[2].update(tensors)
        self._loading[1].add(index)
        if len(self._loading[1]) == count:
            tensors = self._loading[2]
            self._loading = None
            self._reload(tensors)
            self.version = version
        return self.version

    def _reload(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, source in self.aliases.items():
            if source in tensors:
                tensors[name] = tensors[source]
        self.last_reload_tensors = self.engine.load(tensors)

    def generate(self, prompts: PromptBatch, seed: int, expected_version: int) -> Rollout:
        """Sample ``prompts`` in one engine call, row ``i`` seeded by (``seed``, its prompt
        index, its sample index)."""
        if self.version != expected_version:
            raise StaleWeightsError(
                f"rollout worker {self.worker_id} holds weights v{self.version}, "
                f"round needs v{expected_version}"
            )
        out = self.engine.sample(
            prompts.prompt_ids,
            prompts.prompt_mask,
            row_seeds(seed, prompts.prompt_index, prompts.sample_index),
            self.tokenizer.eos_id,
            self.tokenizer.pad_id,
        )
        return sampled_rollout(prompts, out, self.tokenizer, self.version, self.worker_id)

    def greedy(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int
    ) -> torch.Tensor:
        """Greedy continuation ``(B, max_new_tokens)`` (parity checks)."""
        out = self.engine.sample(
            prompt_ids,
            prompt_mask,
            None,
            self.tokenizer.eos_id,
            self.tokenizer.pad_id,
            max_new_tokens,
        )
        return out["response_ids"]

    def probe_logprobs(self) -> torch.Tensor:
        """Log-probs ``(T-1,)`` of the sync probe under the weights the engine holds."""
        ids, _ = probe_batch(self.tokenizer)
        return self.engine.prompt_logprobs(ids[0].tolist(), self.cfg.temperature)

    def ping(self) -> int:
        return self.worker_id
