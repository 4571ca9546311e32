"""Frozen scorers: the reference policy and the reward (model or function)."""

from __future__ import annotations

import torch

from rlhf_ray.models import (
    ScalarHeadModel,
    build_causal_lm,
    build_scalar_model,
    default_device,
    response_logprobs,
    state_dict_from_numpy,
)
from rlhf_ray.models.weights import NumpyWeights, load_weights
from rlhf_ray.rewards import RewardFn, call_reward_function, load_reward_function
from rlhf_ray.tokenization import build_tokenizer
from rlhf_ray.types import Rollout
from rlhf_ray.workers.interface import in_chunks


class ReferenceScorer:
    """Log-probs of responses under the frozen initial policy (or ``reference.model``)."""

    def __init__(
        self,
        model_spec,
        tokenizer_cfg,
        temperature: float,
        chunk_size: int = 16,
        num_threads: int | None = None,
    ):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = default_device()
        self.model = build_causal_lm(model_spec, build_tokenizer(tokenizer_cfg), self.device)
        self.model.requires_grad_(False)
        self.temperature = temperature
        self.chunk_size = chunk_size

    def set_weights(self, weights: NumpyWeights) -> None:
        self.model.load_state_dict(state_dict_from_numpy(weights))

    def load_bucket(self, bucket: NumpyWeights) -> None:
        """Part of the weights (a sync bucket), loaded tensor by tensor."""
        load_weights(self.model, bucket)

    def ping(self) -> str:
        return "reference"

    @torch.no_grad()
    def logprobs(self, rollout: Rollout) -> torch.Tensor:
        def forward(part: Rollout) -> torch.Tensor:
            return response_logprobs(self.model, part.input_ids, part.attention_mask,
                                     part.prompt_len, self.temperature)[0]  # fmt: skip

        return in_chunks(rollout, self.chunk_size, self.device, forward) * rollout.response_mask


class RewardScorer:
    """Scalar scores ``(B,)`` from a reward model or a ``module:callable`` reward function."""

    def __init__(
        self,
        reward_cfg,
        tokenizer_cfg,
        search_path: list[str] | None = None,
        chunk_size: int = 16,
        num_threads: int | None = None,
    ):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.name = reward_cfg.function
        self.chunk_size = chunk_size
        self.device = default_device()
        self.fn: RewardFn | None = None
        self.model: ScalarHeadModel | None = None
        if reward_cfg.function is not None:
            self.fn = load_reward_function(reward_cfg.function, search_path or [])
        else:
            tok = build_tokenizer(tokenizer_cfg)
            self.model = build_scalar_model(reward_cfg.model, tok, self.device)
            self.model.requires_grad_(False)

    def ping(self) -> str:
        return "reward"

    @torch.no_grad()
    def score(self, rollout: Rollout) -> torch.Tensor:
        if self.fn is not None:
            scores = call_reward_function(self.fn, self.name, rollout.prompts, rollout.responses)
            return torch.tensor(scores, dtype=torch.float32)
        model = self.model
        assert model is not None
        return in_chunks(
            rollout,
            self.chunk_size,
            self.device,
            lambda part: model.sequence_scores(part.input_ids, part.attention_mask),
        )
