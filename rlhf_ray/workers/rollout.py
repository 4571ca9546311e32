"""RolloutGenerator: a plain inference copy of the policy that samples responses."""

from __future__ import annotations

import torch

from rlhf_ray.config.roles import trains_lora
from rlhf_ray.data.tokenization import build_tokenizer
from rlhf_ray.engines.generation import SamplingParams, greedy_continuation, sample_responses
from rlhf_ray.models import (
    build_causal_lm,
    default_device,
    response_logprobs,
)
from rlhf_ray.models.build import build_policy_lm
from rlhf_ray.models.weights import NumpyWeights, check_known, load_targets, load_weights
from rlhf_ray.types import PromptBatch, Rollout
from rlhf_ray.workers.collective import SyncMember, receive_bucket
from rlhf_ray.workers.interface import (
    StaleWeightsError,
    probe_batch,
    row_seeds,
    sampled_rollout,
)
from rlhf_ray.workers.threads import PhaseThreads, set_threads


class RolloutGenerator(PhaseThreads, SyncMember):
    """Holds versioned policy weights and samples; refuses to sample with a stale version."""

    def __init__(
        self,
        model_spec,
        tokenizer_cfg,
        rollout_cfg,
        worker_id: int = 0,
        num_threads: int | None = None,
        from_sync: bool = False,
        lora=None,
    ):
        """``from_sync``: the weights come by sync (PPO's pool), so none are read from
        ``model_spec.path``: the model is built from its config (the worker refuses to
        generate before the first sync). Otherwise (evaluation, ``rlhf-ray generate``) the
        model is loaded with its weights. ``lora``: the policy's ``lora`` section; a LoRA
        policy's worker loads its base from ``model_spec`` and the syncs bring the adapters
        (the same peft model as the learner's, so the sampled distribution is the learner's)."""
        set_threads(num_threads)
        self.worker_id = worker_id
        self.tokenizer = build_tokenizer(tokenizer_cfg)
        self.device = default_device()
        if from_sync and trains_lora(lora, model_spec):
            self.model = build_policy_lm(model_spec, lora, self.tokenizer, self.device)
        else:
            weights = not from_sync
            self.model = build_causal_lm(model_spec, self.tokenizer, self.device, weights=weights)
        self.params = SamplingParams(
            rollout_cfg.max_new_tokens,
            rollout_cfg.temperature,
            rollout_cfg.top_k,
            rollout_cfg.top_p,
        )
        self.micro_batch_size = rollout_cfg.micro_batch_size
        self.version = -1  # no weights received yet
        self._loading: tuple[int, set[int]] | None = None  # (version, buckets received)

    def load_bucket(self, bucket: NumpyWeights, version: int, index: int, count: int) -> int:
        """Bucket ``index`` of ``count`` of weights ``version``, loaded tensor by tensor. The
        worker holds a mix of versions until every bucket arrived: meanwhile its version is
        -1 and it refuses to generate. Returns the version it holds now."""
        self._start_loading(version)
        load_weights(self.model, bucket)
        return self._loaded(version, index, count)

    def receive_bucket(self, version: int, index: int, count: int) -> int:
        """``load_bucket`` for a bucket broadcast over the sync group: received straight into
        the model's tensors (a copy only where device or dtype differ)."""
        self._start_loading(version)
        targets = load_targets(self.model)
        got = receive_bucket(self._sync_group(), targets)
        check_known(got, targets)
        with torch.no_grad():
            for name, tensor in got.items():
                if tensor.data_ptr() != targets[name].data_ptr():
                    targets[name].copy_(tensor)
        return self._loaded(version, index, count)

    def _start_loading(self, version: int) -> None:
        if self._loading is None or self._loading[0] != version:
            self._loading = (version, set())
            self.version = -1

    def _loaded(self, version: int, index: int, count: int) -> int:
        assert self._loading is not None
        self._loading[1].add(index)
        if len(self._loading[1]) == count:
            self.version, self._loading = version, None
        return self.version

    def generate(self, prompts: PromptBatch, seed: int, expected_version: int) -> Rollout:
        """Sample ``prompts`` (whole micro-batches of the round, see ``shard_rows``), each row
        seeded by (``seed``: the round's, its prompt index, its sample index)."""
        if self.version != expected_version:
            raise StaleWeightsError(
                f"rollout worker {self.worker_id} holds weights v{self.version}, "
                f"round needs v{expected_version}"
            )
        on_device = prompts.to(self.device)
        out = sample_responses(
            self.model,
            on_device.prompt_ids,
            on_device.prompt_mask,
            self.params,
            self.tokenizer.eos_id,
            self.tokenizer.pad_id,
            row_seeds(seed, prompts.prompt_index, prompts.sample_index),
            self.micro_batch_size,
        )
        out = {k: v.cpu() for k, v in out.items()}
        return sampled_rollout(prompts, out, self.tokenizer, self.version, self.worker_id)

    def greedy(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int
    ) -> torch.Tensor:
        """Greedy continuation (parity checks between workers and learners)."""
        return greedy_continuation(
            self.model,
            prompt_ids,
            prompt_mask,
            max_new_tokens,
            self.tokenizer.eos_id,
            self.tokenizer.pad_id,
        )

    @torch.no_grad()
    def probe_logprobs(self) -> torch.Tensor:
        """Log-probs ``(T-1,)`` of the sync probe under the weights this worker holds."""
        ids, mask = probe_batch(self.tokenizer)
        out = response_logprobs(
            self.model, ids.to(self.device), mask.to(self.device), 1, self.params.temperature
        )[0]
        return out[0].cpu()

    def ping(self) -> int:
        return self.worker_id
