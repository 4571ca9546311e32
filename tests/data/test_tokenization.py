"""Tokenizers: byte-level tiktoken, .tiktoken files, Hugging Face; save() round trips offline."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import tiktoken
import torch
from tiktoken.load import load_tiktoken_bpe
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from rlhf_ray.data.tokenization import (
    DEFAULT_CHAT_TEMPLATE,
    GPT2_PATTERN,
    HFTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    build_tokenizer,
    write_tiktoken_bpe,
)

SAMPLES = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. The thing is, they think.",
    "Héllo wörld, ça va? Naïve café — déjà vu.",
    "emoji 👋🎉🤖 and CJK 漢字かな and Ελληνικά",
    "  leading spaces,\n\nblank lines\tand tabs   ",
    "numbers 2024 12345 3.14159",
    "text with a special <|endoftext|> in the middle",
    "",
]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Héllo wörld, ça va? Naïve café 👋🎉",
    "the theory of the thing is that things think",
    "In 2024, 12345 numbers and 3.14159 pi.",
] * 50
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
]


@dataclass
class Spec:
    kind: str
    name_or_path: str | None = None


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def train_backend(vocab_size: int = 400) -> BackendTokenizer:
    """A tiny byte-level BPE trained with `tokenizers` (GPT-2 style, no special tokens)."""
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    return backend


@pytest.fixture
def hf_dir(tmp_path: Path) -> Path:
    """A saved HF tokenizer with an EOS but no pad token and no chat template."""
    backend = train_backend()
    backend.add_special_tokens(["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    directory = tmp_path / "hf_tok"
    tokenizer.save_pretrained(str(directory))
    return directory


@pytest.fixture
def tiktoken_file(tmp_path: Path) -> Path:
    """A .tiktoken rank file with real merges (ranks taken from a trained byte-level BPE)."""
    byte_decoder = {
        c: b
        for b, c in importlib.import_module("transformers.convert_slow_tokenizer")
        .bytes_to_unicode()
        .items()
    }
    vocab = train_backend().get_vocab()
    ranks = {bytes(byte_decoder[c] for c in token): i for token, i in vocab.items()}
    assert any(len(token) > 2 for token in ranks)
    path = tmp_path / "mini.tiktoken"
    write_tiktoken_bpe(ranks, path)
    return path


def assert_same_as_saved(tok: Tokenizer, directory: Path) -> None:
    tok.save(directory)
    loaded = AutoTokenizer.from_pretrained(str(directory))
    for text in SAMPLES:
        ids = tok.encode(text)
        assert loaded.encode(text, add_special_tokens=False) == ids, text
        assert loaded.decode(ids, skip_special_tokens=True) == tok.decode(ids), text
    assert (loaded.pad_token_id, loaded.eos_token_id) == (tok.pad_id, tok.eos_id)
    assert len(loaded) == tok.vocab_size
    reloaded = HFTokenizer(loaded)
    for a, b in zip(
        reloaded.encode_batch_left_padded(SAMPLES, 12),
        tok.encode_batch_left_padded(SAMPLES, 12),
        strict=True,
    ):
        assert torch.equal(a, b)
    assert reloaded.apply_chat(MESSAGES) == tok.apply_chat(MESSAGES)


# ----------------------------------------------------------------------------- byte level


def test_byte_level_round_trips_any_text_with_one_id_per_byte():
    tok = build_tokenizer(Spec("bytes"))
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == 258
    for text in SAMPLES[:-2]:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
    assert tok.encode("é") == [0xC3, 0xA9]


def test_pad_and_eos_are_distinct_specials_and_decode_skips_them():
    tok = TiktokenTokenizer.byte_level()
    assert tok.pad_id != tok.eos_id
    assert {tok.pad_id, tok.eos_id} == {256, 257}
    assert tok.bos_id is None
    ids = tok.encode("hi<|endoftext|>")
    assert ids == [104, 105, tok.eos_id]
    assert tok.decode(ids + [tok.pad_id]) == "hi"
    assert tok.decode(ids + [tok.pad_id], skip_special_tokens=False) == "hi<|endoftext|><|pad|>"
    assert tok.decode(torch.tensor(ids)) == "hi"


def test_left_padding_pads_on_the_left_and_truncation_keeps_the_end():
    tok = TiktokenTokenizer.byte_level()
    input_ids, attention_mask = tok.encode_batch_left_padded(["ab", "abcdefgh", ""], max_length=5)
    assert input_ids.dtype == torch.long and attention_mask.dtype == torch.long
    pad = tok.pad_id
    assert input_ids.tolist() == [
        [pad, pad, pad, 97, 98],
        [100, 101, 102, 103, 104],  # the last 5 bytes of "abcdefgh"
        [pad] * 5,
    ]
    assert attention_mask.tolist() == [[0, 0, 0, 1, 1], [1] * 5, [0] * 5]
    short, _ = tok.encode_batch_left_padded(["ab", "a"], max_length=64)
    assert short.shape == (2, 2)  # padded to the longest row, not to max_length
    with pytest.raises(ValueError, match="max_length"):
        tok.encode_batch_left_padded(["a"], max_length=0)


def test_byte_level_save_loads_with_autotokenizer_and_gives_same_ids(tmp_path):
    assert_same_as_saved(TiktokenTokenizer.byte_level(), tmp_path / "bytes_tok")


def test_default_chat_format_is_hh_transcript_and_saved_template_matches(tmp_path):
    tok = TiktokenTokenizer.byte_level()
    text = tok.apply_chat(MESSAGES)
    assert text == (
        "\n\nSystem: Be brief.\n\nHuman: What is 2+2?\n\nAssistant: 4."
        "\n\nHuman: And 3+3?\n\nAssistant:"
    )
    assert not tok.apply_chat(MESSAGES, add_generation_prompt=False).endswith("Assistant:")
    tok.save(tmp_path / "chat")
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "chat"))
    assert loaded.chat_template == DEFAULT_CHAT_TEMPLATE
    for add in (True, False):
        assert loaded.apply_chat_template(
            MESSAGES, tokenize=False, add_generation_prompt=add
        ) == tok.apply_chat(MESSAGES, add_generation_prompt=add)
    with pytest.raises(ValueError, match="unknown role"):
        tok.apply_chat([{"role": "tool", "content": "x"}])


# ----------------------------------------------------------------------------- tiktoken


def test_tiktoken_file_loads_with_merges_and_saves_with_same_ids(tiktoken_file, tmp_path):
    tok = build_tokenizer(Spec("tiktoken", str(tiktoken_file)))
    num_ranks = len(load_tiktoken_bpe(str(tiktoken_file)))
    assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (num_ranks, num_ranks + 1, num_ranks + 2)
    text = "the theory of the thing"
    assert len(tok.encode(text)) < len(text.encode())  # merges are used
    for sample in SAMPLES:
        assert tok.decode(tok.encode(sample)) == sample.replace("<|endoftext|>", "")
    assert_same_as_saved(tok, tmp_path / "mini_tok")


def test_tiktoken_encoding_with_gaps_in_special_ids_keeps_ids_when_saved(tmp_path):
    encoding = tiktoken.Encoding(
        name="gappy",
        pat_str=GPT2_PATTERN,
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={"<|endoftext|>": 256, "<|im_start|>": 260},
    )
    tok = TiktokenTokenizer(encoding)
    assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (256, 261, 262)
    tok.save(tmp_path / "gappy")
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "gappy"))
    text = "a<|im_start|>b<|endoftext|>c<|pad|>"
    assert (
        loaded.encode(text, add_special_tokens=False)
        == tok.encode(text)
        == [97, 260, 98, 256, 99, 261]
    )


def test_tiktoken_build_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="name_or_path is required"):
        build_tokenizer(Spec("tiktoken"))
    with pytest.raises(ValueError, match="not found"):
        build_tokenizer(Spec("tiktoken", str(tmp_path / "missing.tiktoken")))
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("not base64 at all\n")
    with pytest.raises(ValueError, match="bad.tiktoken"):
        build_tokenizer(Spec("tiktoken", str(bad)))
    with pytest.raises(ValueError, match="no_such_encoding"):
        build_tokenizer(Spec("tiktoken", "no_such_encoding"))
    with pytest.raises(ValueError, match="kind='bytes'"):
        build_tokenizer(Spec("bytes", "gpt2"))
    with pytest.raises(ValueError, match="tokenizer.kind"):
        build_tokenizer(Spec("sentencepiece", "x"))


# ----------------------------------------------------------------------------- Hugging Face


def test_hf_tokenizer_without_pad_gets_a_distinct_pad_and_grows_vocab(hf_dir):
    base = AutoTokenizer.from_pretrained(str(hf_dir))
    assert base.pad_token_id is None
    tok = build_tokenizer(Spec("hf", str(hf_dir)))
    assert isinstance(tok, HFTokenizer)
    assert tok.pad_id != tok.eos_id
    assert tok.vocab_size == len(base) + 1
    assert tok.pad_id == len(base)  # the new token takes the next id
    for text in SAMPLES:
        assert tok.encode(text) == base.encode(text, add_special_tokens=False)
    assert tok.decode(tok.encode("Naïve café 👋")) == "Naïve café 👋"


def test_hf_left_padding_and_truncation_keep_the_end(hf_dir):
    tok = build_tokenizer(Spec("hf", str(hf_dir)))
    long_ids = tok.encode(SAMPLES[1])
    input_ids, attention_mask = tok.encode_batch_left_padded(["Hello", SAMPLES[1]], max_length=6)
    assert input_ids.shape == (2, 6)
    assert input_ids[1].tolist() == long_ids[-6:]
    hello = tok.encode("Hello")
    assert input_ids[0].tolist() == [tok.pad_id] * (6 - len(hello)) + hello
    assert attention_mask[0].tolist() == [0] * (6 - len(hello)) + [1] * len(hello)


def test_hf_save_round_trips_with_pad_and_default_chat_template(hf_dir, tmp_path):
    tok = build_tokenizer(Spec("hf", str(hf_dir)))
    assert tok.apply_chat(MESSAGES) == TiktokenTokenizer.byte_level().apply_chat(MESSAGES)
    assert_same_as_saved(tok, tmp_path / "hf_saved")


def test_hf_tokenizer_uses_its_own_chat_template(hf_dir):
    base = AutoTokenizer.from_pretrained(str(hf_dir))
    base.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    tok = HFTokenizer(base)
    assert tok.apply_chat(MESSAGES[1:2], add_generation_prompt=False) == "<user>What is 2+2?"


def test_hf_pad_equal_to_eos_is_replaced(hf_dir):
    base = AutoTokenizer.from_pretrained(str(hf_dir))
    base.pad_token = base.eos_token
    tok = HFTokenizer(base)
    assert tok.pad_id != tok.eos_id
    assert tok.tokenizer.convert_ids_to_tokens(tok.pad_id) == "<|pad|>"


def test_hf_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="name_or_path is required"):
        build_tokenizer(Spec("hf"))
    with pytest.raises(ValueError, match="could not load a Hugging Face tokenizer"):
        build_tokenizer(Spec("hf", str(tmp_path / "nowhere")))


# --------------------------------------------------------------------------- PPO prompts: BOS


def llama_style(tmp_path: Path, chat_template: str | None = None) -> HFTokenizer:
    """A saved, reloaded HF tokenizer that adds BOS like Llama's (a post-processor)."""
    from tokenizers.processors import TemplateProcessing

    backend = train_backend()
    backend.add_special_tokens(["<s>", "</s>"])
    bos = backend.token_to_id("<s>")
    backend.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>",
                                        eos_token="</s>", chat_template=chat_template)  # fmt: skip
    tokenizer.save_pretrained(str(tmp_path / "llama_tok"))
    return HFTokenizer.from_pretrained(str(tmp_path / "llama_tok"))


def test_llama_style_prompts_start_with_exactly_one_bos(tmp_path):
    from rlhf_ray.data.tokenization import encode_prompts

    tok = llama_style(tmp_path)
    assert tok.prefix_ids == [tok.bos_id]
    texts = ["Hello, world!", "the thing", "<s>already has one"]
    ids, mask, truncated = encode_prompts(tok, texts, max_length=64)
    assert truncated == 0
    for row, text in enumerate(texts):
        real = ids[row, mask[row].bool()].tolist()
        assert real[0] == tok.bos_id and real.count(tok.bos_id) == 1, text
        assert real[1:] == tok.encode(text.removeprefix("<s>"))
    # what transformers itself gives with add_special_tokens=True, where no BOS was written
    assert ids[0, mask[0].bool()].tolist() == tok.tokenizer.encode(texts[0])


def test_a_chat_template_that_writes_bos_gets_no_second_one(tmp_path):
    from rlhf_ray.data.tokenization import chat_template_start, encode_prompts

    template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")  # fmt: skip
    tok = llama_style(tmp_path, template)
    text = tok.apply_chat([{"role": "user", "content": "the thing is that things think"}])
    assert text.startswith("<s><|user|>")
    start = chat_template_start(tok)
    assert start == "<s><|user|>"
    ids, mask, _ = encode_prompts(tok, [text], max_length=64, template_start=start)
    real = ids[0, mask[0].bool()].tolist()
    assert real.count(tok.bos_id) == 1 and real[0] == tok.bos_id
    # truncated: BOS and the template's start stay, then the prompt's last tokens
    head = tok.encode(start)
    short, short_mask, truncated = encode_prompts(tok, [text], max_length=len(head) + 4,
                                                  template_start=start)  # fmt: skip
    assert truncated == 1
    assert short[0].tolist() == head + real[-4:] and short_mask.all()


def test_gpt2_style_prompts_get_no_bos_and_truncation_keeps_the_end(hf_dir):
    from rlhf_ray.data.tokenization import encode_prompts

    for tok in (HFTokenizer.from_pretrained(str(hf_dir)), TiktokenTokenizer.byte_level()):
        assert tok.prefix_ids == []
        text = "The quick brown fox jumps over the lazy dog."
        ids, mask, truncated = encode_prompts(tok, [text, "the"], max_length=5)
        assert truncated == 1
        assert ids[0].tolist() == tok.encode(text)[-5:]
        assert ids[1, mask[1].bool()].tolist() == tok.encode("the")


def test_llama_style_truncation_keeps_bos(tmp_path):
    from rlhf_ray.data.tokenization import encode_prompts

    tok = llama_style(tmp_path)
    text = "The quick brown fox jumps over the lazy dog."
    ids, mask, truncated = encode_prompts(tok, [text, "the"], max_length=5)
    assert truncated == 1
    assert ids[0].tolist() == [tok.bos_id, *tok.encode(text)[-4:]]
    assert ids[1, mask[1].bool()].tolist() == [tok.bos_id, *tok.encode("the")]
