"""Model directories for tests, as the stages save them: tiny policies and reward models with
their tokenizer, a locally trained Hugging Face BPE tokenizer, and a reward model fitted (plain
torch, Bradley-Terry) to a learnable preference: lowercase text over junk."""

from __future__ import annotations

import random
import string
from pathlib import Path

import torch
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


def _text(rng: random.Random, lower_fraction: float) -> str:
    n = rng.randint(4, 16)
    return "".join(rng.choice(LOWER if rng.random() < lower_fraction else JUNK) for _ in range(n))


def lowercase_pairs(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected): the chosen reply has a larger fraction of lowercase letters."""
    rng, prompts = random.Random(seed), load_prompts()
    pairs = []
    for _ in range(n):
        low, high = sorted(rng.sample([i / 10 for i in range(11)], 2))
        pairs.append((rng.choice(prompts), _text(rng, high), _text(rng, low)))
    return pairs


def fit_reward_model(directory: Path, tok: Tokenizer, steps: int = 80, seed: int = 0) -> Path:
    """A tiny reward model trained on ``lowercase_pairs`` (prompt + reply text in ``tok``),
    saved with ``tok``; asserts it ranks held-out pairs well."""
    torch.manual_seed(seed)
    model = build_scalar_model(ModelSpec(init_seed=seed), tok)
    model.train()
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    pairs = lowercase_pairs(steps * 16, seed)

    def scores(batch: list[tuple[str, str, str]], side: int) -> torch.Tensor:
        ids, mask = tok.encode_batch_left_padded([b[0] + b[side] for b in batch], 96)
        return model.sequence_scores(ids, mask)

    for step in range(steps):
        batch = pairs[step * 16 : (step + 1) * 16]
        loss = -torch.nn.functional.logsigmoid(scores(batch, 1) - scores(batch, 2)).mean()
        optim.zero_grad()
        loss.backward()
        optim.step()
    model.eval()
    with torch.no_grad():
        held_out = lowercase_pairs(64, seed + 1)
        accuracy = float((scores(held_out, 1) > scores(held_out, 2)).float().mean())
    assert accuracy > 0.8, f"the test reward model did not learn ({accuracy:.2f})"
    model.save_pretrained(str(directory))
    tok.save(directory)
    return directory
