"""Frozen scorers: the reference policy and the reward (model or function)."""

from __future__ import annotations

import torch

from rlhf_ray.algo import append_eos
from rlhf_ray.config.ppo import reward_tokenizer
from rlhf_ray.data.stage_data import render_for
from rlhf_ray.data.tokenization import (
    Tokenizer,
    build_tokenizer,
    encode_prompt,
    left_pad,
    same_tokenizer,
)
from rlhf_ray.models import (
    ScalarHeadModel,
    build_causal_lm,
    build_scalar_model,
    default_device,
    max_positions,
    response_logprobs,
)
from rlhf_ray.models.weights import NumpyWeights, load_weights
from rlhf_ray.rewards.remote import RemoteOptions
from rlhf_ray.rewards.terms import RewardParts
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

    def load_bucket(self, bucket: NumpyWeights) -> None:
        """Part of the weights (a sync bucket), loaded tensor by tensor."""
        load_weights(self.model, bucket)

    def ping(self) -> str:
        return "reference"

    @torch.no_grad()
    def logprobs(self, rollout: Rollout) -> torch.Tensor:
        def forward(part: Rollout) -> torch.Tensor:
            return response_logprobs(
                self.model, part.input_ids, part.attention_mask, part.prompt_len, self.temperature
            )[0]

        return in_chunks(rollout, self.chunk_size, self.device, forward) * rollout.response_mask


class RewardScorer:
    """Scalar scores ``(B,)`` from a reward model, a ``module:callable`` reward function or a
    remote service, plus ``reward.terms`` (``workers.reward_parts``).

    A reward model whose directory holds its own tokenizer, different from the policy's (another
    model family), reads the rollout as text, the conversation re-rendered in the reward
    model's own chat format (``data.stage_data.render_for``) and encoded as train-rm encodes it
    (``encode_prompt``: with that tokenizer's BOS), then the response and its EOS, keeping the last tokens that fit its positions. With the policy's
    tokenizer it reads the rollout's token ids directly. Either way a response cut before it
    sampled EOS is read with EOS appended (``reward.append_eos``, ``algo.append_eos``), so the
    score is read where train-rm taught the model to give one.
    """

    def __init__(
        self,
        reward_cfg,
        tokenizer_cfg,
        search_path: list[str] | None = None,
        chunk_size: int = 16,
        num_threads: int | None = None,
        remote: RemoteOptions | None = None,
    ):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.name = reward_cfg.function
        self.append_eos = reward_cfg.append_eos
        self.chunk_size = chunk_size
        self.device = default_device()
        self.model: ScalarHeadModel | None = None
        self.text_tokenizer: Tokenizer | None = None  # set when the model reads text
        if reward_cfg.model is not None:
            policy_tok = build_tokenizer(tokenizer_cfg)
            tok = build_tokenizer(reward_tokenizer(reward_cfg, tokenizer_cfg))
            self.model = build_scalar_model(reward_cfg.model, tok, self.device)
            self.model.requires_grad_(False)
            self.eos_id, self.pad_id = tok.eos_id, tok.pad_id
            self.max_length = max_positions(self.model.config)
            if not same_tokenizer(tok, policy_tok):
                self.text_tokenizer = tok
        # the main score (this model's, a function's or a service's) plus reward.terms
        self.parts = RewardParts(reward_cfg, search_path or [], self.model_scores, remote)

    def ping(self) -> str:
        return "reward"

    def encode_text(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` of prompt + response text in the reward model's
        tokenizer, left-padded (``text_tokenizer`` must be set)."""
        tok = self.text_tokenizer
        assert tok is not None
        rows = []
        for prompt, response, eos in zip(
            rollout.prompts, rollout.responses, rollout.has_eos.tolist(), strict=True
        ):
            prompt, response = render_for(tok, prompt, response)  # its own chat template
            ids = encode_prompt(tok, prompt, self.max_length)[0] + tok.encode(response)
            rows.append(ids + ([tok.eos_id] if eos or self.append_eos else []))
        return left_pad(rows, tok.pad_id, self.max_length)

    def token_input(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` of the rollout's own ids (the policy's tokenizer),
        with EOS appended to the rows cut before it when ``append_eos``."""
        if not self.append_eos:
            return rollout.input_ids, rollout.attention_mask
        ids, mask = append_eos(
            rollout.input_ids, rollout.attention_mask, rollout.has_eos, self.eos_id, self.pad_id
        )
        return ids[:, -self.max_length :], mask[:, -self.max_length :]  # the last that fit

    def score(self, rollout: Rollout) -> torch.Tensor:
        """The total score ``(B,)`` (``score_parts``'s ``scores``)."""
        return self.score_parts(rollout)["scores"]

    def score_parts(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """``scores`` and each part's scores and stats (``workers.reward_parts``)."""
        return self.parts.score(rollout)

    @torch.no_grad()
    def model_scores(self, rollout: Rollout) -> torch.Tensor:
        model = self.model
        assert model is not None
        if self.text_tokenizer is None:
            return in_chunks(
                rollout,
                self.chunk_size,
                self.device,
                lambda part: model.sequence_scores(*self.token_input(part)),
            )
        ids, mask = self.encode_text(rollout)
        return torch.cat(
            [
                model.sequence_scores(
                    ids[i : i + self.chunk_size].to(self.device),
                    mask[i : i + self.chunk_size].to(self.device),
                ).cpu()
                for i in range(0, len(ids), self.chunk_size)
            ]
        )
