"""Checks of a run's model directories and tokenizers, before any actor starts.

Everything here loads only tokenizers (seconds), so a wrong path or an incompatible pair of
models fails with one paragraph instead of after the actor graph has started.
"""

from __future__ import annotations

from rlhf_ray.config import Config, TokenizerConfig, policy_tokenizer, reward_tokenizer
from rlhf_ray.errors import UserError
from rlhf_ray.tokenization import Tokenizer, build_tokenizer, same_tokenizer


def load_tokenizer(tok: TokenizerConfig, what: str) -> Tokenizer:
    """``build_tokenizer`` with its failure turned into a ``UserError`` naming ``what``."""
    try:
        return build_tokenizer(tok)
    except ValueError as exc:
        raise UserError(f"{what}: {exc}") from None


def check_models(cfg: Config) -> None:
    """The policy's and the reward model's tokenizers load, and a critic initialised from the
    reward model (``value.init_from_reward``) reads the policy's token ids."""
    policy_tok_cfg = policy_tokenizer(cfg)
    policy_tok = load_tokenizer(policy_tok_cfg, "the policy's tokenizer")
    if cfg.reward.model is None:
        return
    reward_tok = load_tokenizer(
        reward_tokenizer(cfg.reward, policy_tok_cfg), "the reward model's tokenizer"
    )
    if cfg.value.init_from_reward and not same_tokenizer(policy_tok, reward_tok):
        raise UserError(
            f"value.init_from_reward: the reward model {cfg.reward.model.path} has a tokenizer "
            "other than the policy's, and the critic reads the policy's token ids; start the "
            "critic from its own value.model, or use a reward model trained on the policy's "
            "tokenizer"
        )
