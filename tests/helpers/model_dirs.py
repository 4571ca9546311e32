"""Model directories for tests, as the stages save them: tiny random policies and reward models
with their tokenizer, and a locally trained Hugging Face BPE tokenizer."""

from __future__ import annotations

import random
import string
from pathlib import Path

from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rlhf_ray.config.ppo import ModelSpec
from rlhf_ray.data.prompts import load_prompts
from rlhf_ray.data.tokenization import EOS_TOKEN, HFTokenizer, Tokenizer
from rlhf_ray.models import build_causal_lm, build_scalar_model

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


# the bytes of LOWER, and every other byte: a byte-level policy's vocabulary, split by the property
LOWER_BYTES = LOWER.encode()
OTHER_BYTES = bytes(b for b in range(256) if b not in LOWER_BYTES)


def policy_like_bytes(rng: random.Random, lower_p: float) -> bytes:
    """What a byte-level policy emits in up to 16 tokens (0 to 16 bytes) when it picks a byte
    of LOWER with probability ``lower_p`` and any other byte otherwise."""
    return bytes(rng.choice(LOWER_BYTES if rng.random() < lower_p else OTHER_BYTES)
                 for _ in range(rng.randint(0, 16)))  # fmt: skip


def as_text(data: bytes) -> str:
    """Bytes as the byte-level tokenizer decodes them: UTF-8 with replacement (so mostly
    U+FFFD, control characters and punctuation for a random policy)."""
    return data.decode("utf-8", errors="replace")


def lowercase_count(text: str) -> int:
    """The letters and spaces of LOWER in ``text``: what ``lowercase_pairs`` prefers more of."""
    return sum(c in LOWER for c in text)


def _with_more_lowercase(rng: random.Random, data: bytes, max_edits: int) -> bytes:
    """``data`` with 1 to ``max_edits`` of its bytes outside LOWER turned into LOWER ones."""
    out = bytearray(data)
    others = [i for i, b in enumerate(out) if b not in LOWER_BYTES]
    for i in rng.sample(others, min(rng.randint(1, max_edits), len(others))):
        out[i] = rng.choice(LOWER_BYTES)
    return bytes(out)


def lowercase_pairs(n: int, seed: int = 0, max_edits: int = 4) -> list[dict[str, str]]:
    """A learnable preference set that a tiny random byte-level policy can climb: ``prompt``/
    ``chosen``/``rejected`` rows over the bundled prompts whose chosen reply has more lowercase
    letters and spaces (LOWER). Replies are written the way such a policy writes
    (``policy_like_bytes``, each with a random share of LOWER). Half the pairs are two such
    replies (any lengths, the empty one included); in the other half the chosen reply is the
    rejected one with 1 to ``max_edits`` bytes turned into LOWER, so that nothing else tells them
    apart: the reward model learns what each letter is worth, at any share, including the
    share of a random policy. Pairs with as many letters on both sides are not used."""
    rng, prompts = random.Random(seed), load_prompts()
    rows: list[dict[str, str]] = []
    while len(rows) < n:
        a = policy_like_bytes(rng, rng.random())
        if rng.random() < 0.5:
            b = policy_like_bytes(rng, rng.random())
        else:
            b = _with_more_lowercase(rng, a, max_edits)
        ta, tb = as_text(a), as_text(b)
        if lowercase_count(ta) != lowercase_count(tb):
            chosen, rejected = (ta, tb) if lowercase_count(ta) > lowercase_count(tb) else (tb, ta)
            rows.append({"prompt": rng.choice(prompts), "chosen": chosen, "rejected": rejected})
    return rows
