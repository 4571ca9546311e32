"""Model directories for tests, as the stages save them: tiny random policies and reward models
with their tokenizer, and a locally trained Hugging Face BPE tokenizer."""

from __future__ import annotations

import random
import string
from pathlib import Path

from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rlhf_ray.config import ModelSpec
from rlhf_ray.data.prompts import load_prompts
from rlhf_ray.models import build_causal_lm, build_scalar_model
from rlhf_ray.tokenization import EOS_TOKEN, HFTokenizer, Tokenizer

LOWER = string.ascii_lowercase + " "
JUNK = string.ascii_uppercase + string.digits + string.punctuation + "\ufffd\n"


def bpe_tokenizer(directory: Path, vocab_size: int = 320) -> HFTokenizer:
    """A byte-level BPE trained here on the bundled prompts and letters; saved to ``directory``."""
    corpus = load_prompts() * 4 + [LOWER * 3, JUNK * 3]
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    backend.train_from_iterator(corpus, trainer)
    backend.add_special_tokens([EOS_TOKEN])
    tok = HFTokenizer(PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN))
    tok.save(directory)
    return tok


def save_policy(directory: Path, tok: Tokenizer, init_seed: int = 0) -> Path:
    build_causal_lm(ModelSpec(init_seed=init_seed), tok).save_pretrained(str(directory))
    tok.save(directory)
    return directory


def save_reward_model(directory: Path, tok: Tokenizer, init_seed: int = 0) -> Path:
    build_scalar_model(ModelSpec(init_seed=init_seed), tok).save_pretrained(str(directory))
    tok.save(directory)
    return directory


def _reply(rng: random.Random, lower_fraction: float) -> str:
    n = rng.randint(4, 16)
    return "".join(rng.choice(LOWER if rng.random() < lower_fraction else JUNK) for _ in range(n))


def lowercase_pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    """A learnable preference set: ``prompt``/``chosen``/``rejected`` rows over the bundled
    prompts whose chosen reply has the larger fraction of lowercase letters and spaces (the rest
    is upper case, digits, punctuation, U+FFFD: what a random byte-level policy emits)."""
    rng, prompts = random.Random(seed), load_prompts()
    rows = []
    for _ in range(n):
        low, high = sorted(rng.sample([i / 10 for i in range(11)], 2))
        rows.append({"prompt": rng.choice(prompts), "chosen": _reply(rng, high),
                     "rejected": _reply(rng, low)})  # fmt: skip
    return rows
