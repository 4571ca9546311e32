"""A LoRA policy's adapters in a vLLM engine, one LoRA adapter per weight version.

vLLM serves an adapter beside the base weights it started with (``enable_lora``): the worker
starts the engine on the policy's base, and each sync's adapter tensors become the adapter of
that version (``LoRARequest`` named ``policy-v<version>``, id ``version + 1``). Every request
names the version it samples with, so a rollout never mixes two, and a version no request uses
any more is removed (``remove_lora``) once a newer one is loaded.

vLLM 0.32 reads an adapter from a directory in peft's format only (``adapter_config.json`` +
``adapter_model.safetensors``), so each version is written to a temp dir of its own, loaded
(``add_lora``: parsed into the engine's memory), and the dir is removed at once: vLLM keeps
the adapter in memory and never reads the dir again unless it evicts the adapter, which it
does not below ``MAX_LORAS`` adapters. Nothing on disk outlives the sync (a worker stopped by
``ray.kill`` runs no destructor).

vLLM serves LoRA only on architectures whose vLLM class supports it (Llama and most decoder
LMs, not GPT-2) and ranks up to 512, with no ``modules_to_save``; ``serves_lora`` says which.
For the others the worker merges the adapters into its own copy of the base and reloads the
merged weights in place, as a full-weight sync does (``workers.vllm_rollout``).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch

# vLLM 0.32's ``MaxLoRARanks``: the engine's max_lora_rank must be one of these
LORA_RANK_SLOTS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# the current version plus one that requests still sample with while the next one loads
MAX_LORAS = 2


def lora_rank_slot(r: int) -> int | None:
    """The smallest ``max_lora_rank`` vLLM accepts for adapters of rank ``r`` (None: above
    every slot)."""
    return next((slot for slot in LORA_RANK_SLOTS if slot >= r), None)


def lora_kwargs(r: int) -> dict[str, Any]:
    """The ``vllm.LLM`` arguments that let it serve the policy's adapters of rank ``r``."""
    slot = lora_rank_slot(r)
    if slot is None:
        raise ValueError(f"vLLM serves LoRA ranks up to {LORA_RANK_SLOTS[-1]}, not {r}")
    return {"enable_lora": True, "max_lora_rank": slot, "max_loras": MAX_LORAS}


def serves_lora(architecture: str, peft_config: Any) -> bool:
    """Whether vLLM serves ``peft_config``'s adapters on ``architecture`` (a ``config.json``
    architecture name) itself; else the worker merges them."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.interfaces import supports_lora

    registered = ModelRegistry.models.get(architecture)
    return (
        registered is not None
        and supports_lora(registered.load_model_cls())
        and lora_rank_slot(peft_config.r) is not None
        and not peft_config.modules_to_save
    )


def peft_file_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter tensors a sync sends (the peft model's parameter names,
    ``...q_proj.lora_A.default.weight``) under the names peft saves them with
    (``...q_proj.lora_A.weight``), which vLLM reads."""
    renamed = {re.sub(r"\.(lora_[AB])\.default\.", r".\1.", n): t for n, t in tensors.items()}
    return {name: t.detach().to("cpu").contiguous() for name, t in renamed.items()}


def write_adapter(directory: str, tensors: dict[str, torch.Tensor], peft_config: Any) -> None:
    """``directory`` as a peft adapter directory of ``tensors`` (the sync's names)."""
    from safetensors.torch import save_file

    peft_config.save_pretrained(directory)
    save_file(peft_file_tensors(tensors), f"{directory}/adapter_model.safetensors")


class AdapterVersions:
    """The weight versions of a LoRA policy loaded in one vLLM engine (``VLLMSampler``)."""

    def __init__(self, sampler: Any, peft_config: Any):
        self.sampler, self.peft_config = sampler, peft_config
        self.requests: dict[int, Any] = {}  # version -> its LoRARequest
        self.in_use: Counter[int] = Counter()  # version -> requests sampling with it now
        self.current: int | None = None

    def load(self, version: int, tensors: dict[str, torch.Tensor]) -> int:
        """Load ``tensors`` (the adapters, sync names) as ``version``'s adapter; unload the
        versions no request uses. Returns the number of tensors."""
        from vllm.lora.request import LoRARequest

        if len(self.requests) >= MAX_LORAS and version not in self.requests:
            raise RuntimeError(
                f"{len(self.requests)} adapter versions still in use; a new one would evict one"
            )
        directory = tempfile.mkdtemp(prefix=f"rlhf_ray-lora-v{version}-")
        try:
            write_adapter(directory, tensors, self.peft_config)
            name, lora_id = f"policy-v{version}", version + 1
            # a version sent again (a retried sync) replaces the one loaded under its id
            if not self.sampler.add_lora(LoRARequest(name, lora_id, directory, load_inplace=True)):
                raise RuntimeError(f"vLLM did not load the adapter of weights v{version}")
        finally:  # vLLM holds the adapter in memory now
            shutil.rmtree(directory, ignore_errors=True)
        # what requests name: the loaded adapter by its id (its dir is never read again)
        self.requests[version] = LoRARequest(name, lora_id, directory)
        self.current = version
        self.unload_unused()
        return len(tensors)

    @contextlib.contextmanager
    def use(self, version: int) -> Iterator[Any]:
        """The ``LoRARequest`` of ``version``, counted as in use until the block ends."""
        if version not in self.requests:
            raise RuntimeError(f"no adapter of weights v{version} is loaded")
        self.in_use[version] += 1
        try:
            yield self.requests[version]
        finally:
            self.in_use[version] -= 1
            self.unload_unused()

    def unload_unused(self) -> None:
        """Remove from the engine every version but the current one that no request uses."""
        for version in [v for v in self.requests if v != self.current and not self.in_use[v]]:
            self.sampler.remove_lora(self.requests.pop(version).lora_int_id)

    def loaded(self) -> set[int]:
        """The versions whose adapters the engine holds (from the engine's own list)."""
        return {lora_id - 1 for lora_id in self.sampler.list_loras()}
