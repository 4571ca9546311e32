"""Frozen scorers: the reference policy and the reward (a model, an ensemble, a function or a
service, plus terms)."""

from __future__ import annotations

import torch

from rlhf_ray.algo import append_eos, combine_ensemble, ensemble_std
from rlhf_ray.config.ppo import reward_tokenizer
from rlhf_ray.config.roles import reward_models
from rlhf_ray.data.stage_data import render_for
from rlhf_ray.data.tokenization import (
    Tokenizer,
    build_tokenizer,
    encode_prompt,
    left_pad,
    same_tokenizer,
)
from rlhf_ray.errors import UserError
from rlhf_ray.models import (
    ScalarHeadModel,
    build_causal_lm,
    build_scalar_model,
    default_device,
    max_positions,
    response_logprobs,
)
from rlhf_ray.models.score_stats import read_score_stats
from rlhf_ray.models.weights import NumpyWeights, load_weights
from rlhf_ray.rewards.remote import RemoteOptions
from rlhf_ray.rewards.terms import RewardParts
from rlhf_ray.types import Rollout
from rlhf_ray.workers.interface import in_chunks
from rlhf_ray.workers.threads import PhaseThreads, set_threads


class ReferenceScorer(PhaseThreads):
    """Log-probs of responses under the frozen initial policy (or ``reference.model``)."""

    def __init__(
        self,
        model_spec,
        tokenizer_cfg,
        temperature: float,
        chunk_size: int = 16,
        num_threads: int | None = None,
    ):
        set_threads(num_threads)
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


class RewardModelReader:
    """One reward model and how it reads a rollout (a main model, an ensemble member or a
    term's model).

    A model whose directory holds its own tokenizer, different from the policy's (another
    model family), reads the rollout as text, the conversation re-rendered in the reward
    model's own chat format (``data.stage_data.render_for``) and encoded as train-rm encodes it
    (``encode_prompt``: with that tokenizer's BOS), then the response and its EOS, keeping the
    last tokens that fit its positions. With the policy's tokenizer it reads the rollout's
    token ids directly. Either way a response cut before it sampled EOS is read with EOS
    appended (``reward.append_eos``, ``algo.append_eos``), so the score is read where train-rm
    taught the model to give one.
    """

    def __init__(self, spec, reward_cfg, tokenizer_cfg, chunk_size: int, device):
        self.append_eos, self.chunk_size, self.device = reward_cfg.append_eos, chunk_size, device
        policy_tok = build_tokenizer(tokenizer_cfg)
        tok = build_tokenizer(reward_tokenizer(reward_cfg, tokenizer_cfg, spec))
        self.model: ScalarHeadModel = build_scalar_model(spec, tok, device)
        self.model.requires_grad_(False)
        self.eos_id, self.pad_id = tok.eos_id, tok.pad_id
        self.max_length = max_positions(self.model.config)
        # set when the model reads text
        self.text_tokenizer = None if same_tokenizer(tok, policy_tok) else tok

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

    def scored(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """``{"scores": scores(rollout)}``: a model part of ``rewards.RewardParts``."""
        return {"scores": self.scores(rollout)}

    @torch.no_grad()
    def scores(self, rollout: Rollout) -> torch.Tensor:
        """Raw scores ``(B,)`` on the CPU."""
        model = self.model
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


class RewardScorer(PhaseThreads):
    """Scalar scores ``(B,)`` from a reward model, an ensemble of them, a ``module:callable``
    reward function or a remote service, plus ``reward.terms`` (``rewards.terms``).

    Every reward model (main, ensemble member, term) is a ``RewardModelReader``: each reads
    the rollout in its own tokenizer. An ensemble's members are standardised with their stored
    train-set statistics (``reward.ensemble.standardize: model``) and combined per sample
    (``algo.combine_ensemble``); their scores and the std across them are reported.
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
        set_threads(num_threads)
        self.name = reward_cfg.function
        self.ensemble = reward_cfg.ensemble
        self.device = default_device()

        def reader(spec) -> RewardModelReader:
            return RewardModelReader(spec, reward_cfg, tokenizer_cfg, chunk_size, self.device)

        specs = reward_models(reward_cfg)
        self.readers = [reader(spec) for spec in specs]
        self.member_stats = (
            [member_score_stats(i, spec) for i, spec in enumerate(specs)]
            if isinstance(reward_cfg.model, list) and self.ensemble.standardize == "model"
            else None
        )
        terms = {t.name: reader(t.model) for t in reward_cfg.terms if t.model is not None}
        # the main score (a model's or ensemble's, a function's or a service's) plus terms
        term_models = {name: t.scored for name, t in terms.items()}
        self.parts = RewardParts(
            reward_cfg, search_path or [], self.model_scores, term_models, remote
        )

    # the single reward model's reader, as rlhf-ray serve-reward uses it (workers.text_reward)
    @property
    def model(self) -> ScalarHeadModel | None:
        return self.readers[0].model if self.readers else None

    @property
    def max_length(self) -> int:
        return self.readers[0].max_length

    @property
    def text_tokenizer(self) -> Tokenizer | None:
        return self.readers[0].text_tokenizer

    @text_tokenizer.setter
    def text_tokenizer(self, tok: Tokenizer | None) -> None:
        self.readers[0].text_tokenizer = tok

    def encode_text(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        return self.readers[0].encode_text(rollout)

    def ping(self) -> str:
        return "reward"

    def score(self, rollout: Rollout) -> torch.Tensor:
        """The total score ``(B,)`` (``score_parts``'s ``scores``)."""
        return self.score_parts(rollout)["scores"]

    def score_parts(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """``scores`` and each part's scores and stats (``rewards.terms``)."""
        return self.parts.score(rollout)

    def model_scores(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """``scores`` ``(B,)`` of the reward model; of an ensemble, its members' (standardised)
        combined, with each member's ``reward_member/<i>`` and ``reward_ensemble/std``."""
        if len(self.readers) == 1:
            return {"scores": self.readers[0].scores(rollout)}
        members = torch.stack([r.scores(rollout).float() for r in self.readers])
        if self.member_stats is not None:
            mean, std = torch.tensor(self.member_stats).T
            members = (members - mean[:, None]) / std[:, None]
        out = {f"reward_member/{i}": m for i, m in enumerate(members)}
        out["reward_ensemble/std"] = ensemble_std(members)
        out["scores"] = combine_ensemble(members, self.ensemble.combine, self.ensemble.k)
        return out


def member_score_stats(index: int, spec) -> tuple[float, float]:
    """An ensemble member's stored train-set (mean, std), or an error naming it."""
    stats = read_score_stats(spec.path)
    if stats is None or stats[1] <= 0:
        raise UserError(
            f"reward.model[{index}] ({spec.path}) has no stored score statistics (`rlhf-ray "
            "train-rm` writes them into config.json): set reward.ensemble.standardize=none"
        )
    return stats
