"""Checks of a run's model directories and tokenizers, before any actor starts.

Everything here loads only tokenizers (seconds), so a wrong path or an incompatible pair of
models fails with one paragraph instead of after the actor graph has started.
"""

from __future__ import annotations

from rlhf_ray.config import (
    Config,
    TokenizerConfig,
    model_tokenizer,
    policy_tokenizer,
    reward_tokenizer,
)
from rlhf_ray.errors import UserError
from rlhf_ray.stage_config import EvalConfig, eval_tokenizer
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


def check_eval_models(cfg: EvalConfig) -> None:
    """Both policies read the same token ids (the KL compares them token by token), and the
    reward's tokenizer loads."""
    tok_cfg = eval_tokenizer(cfg)
    tok = load_tokenizer(tok_cfg, "the policy's tokenizer")
    own = model_tokenizer(cfg.baseline.path)
    if own is not None and cfg.tokenizer.kind == "auto":
        baseline_tok = load_tokenizer(own, "the baseline's tokenizer")
        if not same_tokenizer(tok, baseline_tok):
            raise UserError(
                f"the baseline {cfg.baseline.path} has a tokenizer other than the policy's "
                f"({tok_cfg.name_or_path or tok_cfg.kind}); eval compares the two token by "
                "token: give both the same tokenizer"
            )
    if cfg.reward.model is not None:
        load_tokenizer(reward_tokenizer(cfg.reward, tok_cfg), "the reward model's tokenizer")
