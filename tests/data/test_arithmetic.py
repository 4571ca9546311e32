"""The built-in arithmetic task: 441 sums A + B (A, B in 0..20) split 220 / 221, disjoint and
the same everywhere, read through the ordinary prompt path with a `label` column."""

from __future__ import annotations

import pytest

from rlhf_ray.data.arithmetic import arithmetic_rows
from rlhf_ray.data.prompts import load_prompt_set
from rlhf_ray.data.sources import load_table


def test_splits_are_disjoint_and_cover_every_problem():
    train, heldout = arithmetic_rows(), arithmetic_rows(heldout=True)
    assert (len(train), len(heldout)) == (220, 221)
    train_p, heldout_p = {r["prompt"] for r in train}, {r["prompt"] for r in heldout}
    assert not train_p & heldout_p
    every = {
        f"What is {a} + {b}? Give only the final number." for a in range(21) for b in range(21)
    }
    assert train_p | heldout_p == every
    for row in train + heldout:  # the label is the sum written in the prompt
        a, b = row["prompt"].removeprefix("What is ").split("?")[0].split(" + ")
        assert row["label"] == int(a) + int(b)


def test_split_is_fixed():
    """A fixed hash of "A + B" orders the problems: these rows stay where they are (if this
    fails, the split moved and runs trained before no longer compare with runs after)."""
    train, heldout = arithmetic_rows(), arithmetic_rows(heldout=True)
    assert train[0] == {"prompt": "What is 8 + 15? Give only the final number.", "label": 23}
    assert arithmetic_rows() == train  # deterministic within a process too
    assert heldout[0] == {"prompt": "What is 16 + 13? Give only the final number.", "label": 29}


def test_first_rows_are_a_fair_sample():
    """Eval takes the first N rows: they must not all be small sums (hashed order, not A-major)."""
    first = [r["label"] for r in arithmetic_rows(heldout=True)[:64]]
    assert min(first) <= 8 and max(first) >= 32


def test_builtin_names_load_as_prompt_sets_with_a_label():
    loaded = load_prompt_set("builtin:arithmetic")
    assert loaded.format == "plain" and loaded.column_names == ("label",)
    assert loaded.conversations[0] == [
        {"role": "user", "content": "What is 8 + 15? Give only the final number."}
    ]
    assert loaded.columns[0] == {"label": 23}
    assert len(load_prompt_set("builtin:arithmetic-heldout").conversations) == 221


def test_unknown_builtin_data_set_is_named():
    with pytest.raises(ValueError, match="unknown built-in data set 'builtin:sums'"):
        load_table("builtin:sums")


def test_chatml_prompt_has_one_start_token():
    """Through a ChatML template (SmolLM2's), the prompt is one user turn after the template's
    system turn, and encodes with a single <|im_start|> first (no BOS added before it)."""
    from rlhf_ray.data.tokenization import HFTokenizer, chat_template_start, encode_prompt
    from tests.helpers.gguf_files import CHATML, SPECIAL

    tok = chatml_tokenizer(CHATML, SPECIAL)
    conv = load_prompt_set("builtin:arithmetic").conversations[0]
    text = tok.apply_chat(conv)
    assert text == (
        "<|im_start|>user\nWhat is 8 + 15? Give only the final number.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids, cut = encode_prompt(tok, text, 64, chat_template_start(tok))
    assert not cut and ids.count(tok.tokenizer.convert_tokens_to_ids("<|im_start|>")) == 2
    assert ids[0] == tok.bos_id == 1
    assert isinstance(tok, HFTokenizer)


def chatml_tokenizer(template: str, special: list[str]):
    """A word-level tokenizer with ChatML's special tokens and template (BOS <|im_start|>,
    not added by encode, as SmolLM2's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from rlhf_ray.data.tokenization import HFTokenizer

    words = ["What", "is", "8", "+", "15", "?", "Give", "only", "the", "final", "number", "."]
    vocab = {t: i for i, t in enumerate([*special, "[UNK]", "user", "assistant", "\n", *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Split(r"\s+|[?.+]|\n", behavior="isolated")
    core.add_special_tokens(special)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=special[1], eos_token=special[2], unk_token="[UNK]"
    )
    fast.chat_template = template
    return HFTokenizer(fast)
