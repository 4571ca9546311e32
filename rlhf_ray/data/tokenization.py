"""One ``Tokenizer`` protocol over Hugging Face tokenizers and tiktoken encodings.

Conventions shared by every implementation:

- ``encode`` adds no special tokens; special-token text such as ``"<|endoftext|>"`` in the input
  is encoded as that special token (the Hugging Face default, and what the saved tokenizer does).
- The pad token is a dedicated special token, never EOS (a pad equal to EOS makes masks and
  reward heads read the wrong position), so a tokenizer without one gets ``"<|pad|>"`` appended
  and its ``vocab_size`` grows by one.
- Batches are padded on the LEFT to the longest row (at most ``max_length``); a row longer than
  ``max_length`` keeps its LAST tokens, the ones next to the response.
- Prompts go through ``encode_prompt`` in every stage (PPO, eval, SFT, reward model): as the
  tokenizer encodes by default (Hugging Face ``add_special_tokens=True``: BOS for Llama, nothing
  for GPT-2; never a second BOS after a chat template that wrote one), truncated on the left but
  keeping BOS and the template's start. Responses never get a BOS.
- The default chat format is the HH-RLHF transcript (``rlhf_ray.data.chat_format.
  render_transcript``): ``"\\n\\nSystem: ...\\n\\nHuman: ...\\n\\nAssistant: ..."`` and, as the
  generation prompt, a final ``"\\n\\nAssistant:"``. ``DEFAULT_CHAT_TEMPLATE`` is the same
  format as a Jinja template; saved tokenizers carry it so ``apply_chat_template`` agrees.
- ``save(directory)`` writes a directory that ``transformers.AutoTokenizer.from_pretrained``
  loads offline and that encodes to the same ids with the same pad/EOS ids. A tiktoken encoding
  is converted with transformers' ``TikTokenConverter`` (ranks -> byte-level BPE vocab and
  merges), its special tokens placed at their tiktoken ids.
"""

from __future__ import annotations

import base64
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import tiktoken
import torch

from rlhf_ray.data.chat_format import render_transcript

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "BYTES_ENCODING_NAME",
    "DEFAULT_CHAT_TEMPLATE",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "HFTokenizer",
    "TiktokenTokenizer",
    "Tokenizer",
    "TokenizerSpec",
    "build_tokenizer",
    "same_tokenizer",
    "byte_level_encoding",
    "chat_template_start",
    "encode_prompt",
    "prompt_head",
    "encode_prompts",
    "left_pad",
    "write_tiktoken_bpe",
]

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
BYTES_ENCODING_NAME = "rlhf_ray_bytes"

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
"""GPT-2's pre-tokenization regex (tiktoken r50k_base); used when a .tiktoken file has none."""

DEFAULT_CHAT_TEMPLATE = (
    "{%- set labels = {'system': 'System', 'user': 'Human', 'assistant': 'Assistant'} -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in labels -%}"
    "{{ raise_exception('unknown role ' ~ message['role']) }}"
    "{%- endif -%}"
    "{{ '\\n\\n' ~ labels[message['role']] ~ ': ' ~ message['content'] }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\\n\\nAssistant:' }}{%- endif -%}"
)
"""Jinja form of ``render_transcript`` (the default chat format), stored in saved tokenizers."""


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of the package needs from a tokenizer."""

    pad_id: int
    eos_id: int
    bos_id: int | None
    prefix_ids: list[int]
    """Special tokens the tokenizer puts before a text by default (Hugging Face
    ``add_special_tokens=True``): BOS for Llama-style tokenizers, none for GPT-2-style ones."""
    vocab_size: int
    """Rows the model's embedding needs: every id this tokenizer can produce, specials included."""

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, no special tokens added."""
        ...

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; invalid UTF-8 becomes U+FFFD."""
        ...

    def encode_batch_left_padded(
        self, texts: list[str], max_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)``, both ``(B, T)`` int64, ``T <= max_length``, left-padded
        with ``pad_id``; rows longer than ``max_length`` keep their last tokens."""
        ...

    def apply_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Chat-formatted text of ``messages`` (roles system/user/assistant)."""
        ...

    def save(self, directory: str | os.PathLike) -> None:
        """Write a directory that ``AutoTokenizer.from_pretrained`` loads to the same ids."""
        ...


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int, max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists to the longest (after keeping each one's last ``max_length`` ids).

    Returns ``(input_ids, attention_mask)`` of shape ``(B, T)``, dtype int64.
    """
    if max_length <= 0:
        raise ValueError(f"max_length must be > 0, got {max_length}")
    kept = [list(s)[-max_length:] for s in sequences]
    width = max((len(s) for s in kept), default=0)
    input_ids = torch.full((len(kept), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(kept), width), dtype=torch.long)
    for row, ids in enumerate(kept):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


def _as_list(ids: Sequence[int] | torch.Tensor) -> list[int]:
    return ids.tolist() if isinstance(ids, torch.Tensor) else [int(i) for i in ids]


def _added_prefix(tok: PreTrainedTokenizerBase) -> list[int]:
    """The ids ``add_special_tokens=True`` puts before a text (a trailing EOS some tokenizers
    add is left out: a prompt is continued by its response)."""
    plain = tok.encode("a", add_special_tokens=False)
    full = tok.encode("a", add_special_tokens=True)
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


def chat_template_start(tokenizer: Tokenizer) -> str:
    """The text a chat-formatted prompt starts with before the first user message's content
    (trailing whitespace dropped, since it tokenizes together with what follows)."""
    sentinel = "\x00rlhf_ray\x00"
    text = tokenizer.apply_chat(
        [{"role": "user", "content": sentinel}], add_generation_prompt=False
    )
    return text.split(sentinel)[0].rstrip()


def prompt_head(tokenizer: Tokenizer, template_start: str | None = None) -> list[int]:
    """What a cut prompt keeps at its start: ``prefix_ids`` (BOS), then ``template_start``."""
    prefix = list(tokenizer.prefix_ids)
    start_ids = tokenizer.encode(template_start) if template_start else []
    if prefix and start_ids[: len(prefix)] == prefix:  # the template writes BOS itself
        start_ids = start_ids[len(prefix) :]
    return prefix + start_ids


def encode_prompt(
    tokenizer: Tokenizer, text: str, max_length: int, template_start: str | None = None
) -> tuple[list[int], bool]:
    """One prompt as the tokenizer encodes it by default (what ``AutoTokenizer(...)(text)``
    gives: ``prefix_ids``, i.e. BOS for Llama-style tokenizers, then the text, never a second
    BOS after a chat template that wrote one), and whether it was cut to ``max_length``.

    A prompt longer than ``max_length`` keeps its head (that prefix, then ``template_start`` if
    the prompt starts with it) and the last tokens that fit after it, the ones next to the
    response. Every stage encodes its prompts with this (PPO, eval, SFT, reward model)."""
    prefix = list(tokenizer.prefix_ids)
    start_ids = prompt_head(tokenizer, template_start)[len(prefix) :]
    body = tokenizer.encode(text)
    ids = body if body[: len(prefix)] == prefix else prefix + body
    if len(ids) <= max_length:
        return ids, False
    head = len(prefix) if ids[: len(prefix)] == prefix else 0
    if start_ids and ids[head : head + len(start_ids)] == start_ids:
        head += len(start_ids)
    head = head if head < max_length else 0
    return ids[:head] + ids[len(ids) - (max_length - head) :], True


def encode_prompts(
    tokenizer: Tokenizer, texts: list[str], max_length: int, template_start: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``encode_prompt`` rows, left-padded: ``(input_ids, attention_mask, number cut)``."""
    rows = [encode_prompt(tokenizer, text, max_length, template_start) for text in texts]
    input_ids, attention_mask = left_pad([ids for ids, _ in rows], tokenizer.pad_id, max_length)
    return input_ids, attention_mask, sum(cut for _, cut in rows)


# --------------------------------------------------------------------------- Hugging Face


class HFTokenizer:
    """A ``transformers`` tokenizer (usually from ``AutoTokenizer.from_pretrained``).

    The wrapped tokenizer is modified in place: padding and truncation sides set to left, an
    EOS ``"<|endoftext|>"`` added if it has none, and a ``"<|pad|>"`` pad token added if it has
    none or if its pad is its EOS.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        tok = tokenizer
        if tok.eos_token_id is None:
            tok.add_special_tokens({"eos_token": EOS_TOKEN})
        if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
            tok.add_special_tokens({"pad_token": PAD_TOKEN})
        if tok.pad_token_id == tok.eos_token_id:
            raise ValueError(
                f"could not give the tokenizer a pad token distinct from EOS {tok.eos_token!r}"
            )
        tok.padding_side = "left"
        tok.truncation_side = "left"
        self.tokenizer = tok
        self.pad_id: int = tok.pad_token_id
        self.eos_id: int = tok.eos_token_id
        self.bos_id: int | None = tok.bos_token_id
        self.prefix_ids: list[int] = _added_prefix(tok)
        self.vocab_size: int = len(tok)

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> HFTokenizer:
        """Load with ``AutoTokenizer.from_pretrained`` (local directory or Hub id)."""
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"could not load a Hugging Face tokenizer from {name_or_path!r}: not a tokenizer "
                f"directory here, and the Hub is unreachable or has no such repo "
                f"({type(e).__name__}: {e})"
            ) from e
        return cls(tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        text = self.tokenizer.decode(_as_list(ids), skip_special_tokens=skip_special_tokens)
        assert isinstance(text, str)  # one sequence in, one string out
        return text

    def encode_batch_left_padded(
        self, texts: list[str], max_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if max_length <= 0:
            raise ValueError(f"max_length must be > 0, got {max_length}")
        batch = self.tokenizer(
            list(texts),
            add_special_tokens=False,
            padding="longest",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        return batch["input_ids"].long(), batch["attention_mask"].long()

    def apply_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not self.tokenizer.chat_template:
            return render_transcript(messages, add_generation_prompt)
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert isinstance(text, str)  # tokenize=False on one conversation gives a string
        return text

    def save(self, directory: str | os.PathLike) -> None:
        """``save_pretrained``; a tokenizer without a chat template gets the default one."""
        if not self.tokenizer.chat_template:
            self.tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        self.tokenizer.save_pretrained(str(directory))


# --------------------------------------------------------------------------- tiktoken


def byte_level_encoding() -> tiktoken.Encoding:
    """The offline default: one token per byte (ids 0-255), ``<|endoftext|>`` = 256, ``<|pad|>``
    = 257; 258 ids in all."""
    return tiktoken.Encoding(
        name=BYTES_ENCODING_NAME,
        pat_str=GPT2_PATTERN,
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={EOS_TOKEN: 256, PAD_TOKEN: 257},
    )


def write_tiktoken_bpe(ranks: dict[bytes, int], path: str | os.PathLike) -> None:
    """Write ranks in the ``.tiktoken`` format (``base64(token) rank`` per line) that
    ``tiktoken.load.load_tiktoken_bpe`` reads (tiktoken's own writer needs ``blobfile``)."""
    with open(path, "w", encoding="ascii") as fh:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            fh.write(f"{base64.b64encode(token).decode('ascii')} {rank}\n")


class TiktokenTokenizer:
    """A ``tiktoken.Encoding`` with EOS and a distinct pad token (added if it lacks them)."""

    def __init__(
        self, encoding: tiktoken.Encoding, eos_token: str = EOS_TOKEN, pad_token: str = PAD_TOKEN
    ) -> None:
        specials = dict(encoding._special_tokens)
        for token in (eos_token, pad_token):
            if token not in specials:
                specials[token] = max([encoding.max_token_value, *specials.values()]) + 1
        if len(specials) != len(encoding._special_tokens):
            # tiktoken's documented way to extend an encoding with special tokens.
            encoding = tiktoken.Encoding(
                name=f"{encoding.name}+specials",
                pat_str=encoding._pat_str,
                mergeable_ranks=encoding._mergeable_ranks,
                special_tokens=specials,
            )
        self.encoding = encoding
        self.eos_token, self.pad_token = eos_token, pad_token
        self.eos_id: int = specials[eos_token]
        self.pad_id: int = specials[pad_token]
        self.bos_id: int | None = None
        self.prefix_ids: list[int] = []
        self.vocab_size: int = encoding.n_vocab
        self._special_ids = frozenset(specials.values())

    @classmethod
    def byte_level(cls) -> TiktokenTokenizer:
        """See ``byte_level_encoding``."""
        return cls(byte_level_encoding())

    @classmethod
    def from_name(cls, name: str) -> TiktokenTokenizer:
        """``tiktoken.get_encoding(name)`` (standard names download their file once)."""
        try:
            encoding = tiktoken.get_encoding(name)
        except Exception as e:  # unknown name (ValueError) or no network (requests errors)
            raise ValueError(
                f"could not load tiktoken encoding {name!r} ({type(e).__name__}: {e}); offline, "
                f"give a local .tiktoken file or kind='bytes'"
            ) from e
        return cls(encoding)

    @classmethod
    def from_file(cls, path: str | os.PathLike, pat_str: str = GPT2_PATTERN) -> TiktokenTokenizer:
        """Ranks from a local ``.tiktoken`` file (``load_tiktoken_bpe``); the file holds no regex
        or special tokens, so ``pat_str`` defaults to GPT-2's and EOS/pad follow the ranks."""
        from tiktoken.load import load_tiktoken_bpe

        path = str(path)
        if not os.path.isfile(path):
            raise ValueError(f"tiktoken file not found: {path}")
        try:
            ranks = load_tiktoken_bpe(path)
        except Exception as e:  # malformed base64 / rank lines
            raise ValueError(f"{path}: not a .tiktoken rank file ({type(e).__name__}: {e})") from e
        name = Path(path).name.removesuffix(".tiktoken")
        return cls(
            tiktoken.Encoding(name=name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens={})
        )

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode(text, allowed_special="all")

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        ids = _as_list(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return self.encoding.decode(ids)

    def encode_batch_left_padded(
        self, texts: list[str], max_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sequences = self.encoding.encode_batch(list(texts), allowed_special="all")
        return left_pad(sequences, self.pad_id, max_length)

    def apply_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return render_transcript(messages, add_generation_prompt)

    def to_hf(self):
        """An equivalent ``transformers`` fast tokenizer (byte-level BPE, same ids)."""
        import importlib

        from tokenizers import AddedToken
        from transformers import PreTrainedTokenizerFast

        # transformers re-exports a function of the same name as the module: import it by path.
        converter = importlib.import_module("transformers.convert_slow_tokenizer").TikTokenConverter
        ranks = self.encoding._mergeable_ranks
        with tempfile.TemporaryDirectory() as tmp:
            rank_file = os.path.join(tmp, "ranks.tiktoken")
            write_tiktoken_bpe(ranks, rank_file)
            backend = converter(vocab_file=rank_file, pattern=self.encoding._pat_str).converted()
        # Added tokens take the next free ids in order: fill any gap in the special ids with
        # placeholders so each special lands on its tiktoken id.
        by_id = {i: t for t, i in self.encoding._special_tokens.items()}
        added = [
            AddedToken(by_id.get(i, f"<|reserved_{i}|>"), normalized=False, special=True)
            for i in range(len(ranks), self.encoding.n_vocab)
        ]
        backend.add_special_tokens(added)
        wrong = {
            t: i for t, i in self.encoding._special_tokens.items() if backend.token_to_id(t) != i
        }
        if backend.get_vocab_size() != self.vocab_size or wrong:
            raise ValueError(
                f"cannot convert tiktoken encoding {self.encoding.name!r} with the same ids "
                f"(non-contiguous ranks?): vocab {backend.get_vocab_size()} vs {self.vocab_size}, "
                f"misplaced specials {wrong}"
            )
        return PreTrainedTokenizerFast(
            tokenizer_object=backend,
            eos_token=self.eos_token,
            pad_token=self.pad_token,
            padding_side="left",
            truncation_side="left",
            clean_up_tokenization_spaces=False,
            chat_template=DEFAULT_CHAT_TEMPLATE,
        )

    def save(self, directory: str | os.PathLike) -> None:
        """Convert (``to_hf``) and ``save_pretrained``: ``tokenizer.json`` + config + template."""
        self.to_hf().save_pretrained(str(directory))


# --------------------------------------------------------------------------- factory


class TokenizerSpec(Protocol):
    """The attributes of ``rlhf_ray.config.ppo.TokenizerConfig`` that ``build_tokenizer`` reads."""

    @property
    def kind(self) -> Literal["auto", "bytes", "tiktoken", "hf"]: ...

    @property
    def name_or_path(self) -> str | None: ...


def build_tokenizer(cfg: TokenizerSpec, model_path: str | None = None) -> Tokenizer:
    """``kind="bytes"``: the built-in byte-level tiktoken encoding (``name_or_path`` unset).
    ``kind="tiktoken"``: a ``.tiktoken`` file path, else an encoding name for
    ``tiktoken.get_encoding``. ``kind="hf"``: a directory or Hub id for ``AutoTokenizer``.
    ``kind="auto"``: the tokenizer the model at ``model_path`` comes with, else the bytes
    (``rlhf_ray.config.ppo.resolve_tokenizer``)."""
    if cfg.kind == "auto":
        from rlhf_ray.config.ppo import TokenizerConfig, resolve_tokenizer

        cfg = resolve_tokenizer(TokenizerConfig(kind="auto"), model_path)
    kind, name = cfg.kind, cfg.name_or_path
    if kind == "bytes":
        if name is not None:
            raise ValueError(
                f"tokenizer.name_or_path must be unset for kind='bytes' (got {name!r}); "
                f"use kind='tiktoken' or kind='hf' to load {name!r}"
            )
        return TiktokenTokenizer.byte_level()
    if kind not in ("tiktoken", "hf"):
        raise ValueError(
            f"tokenizer.kind must be 'auto', 'bytes', 'tiktoken' or 'hf', got {kind!r}"
        )
    if not name:
        what = (
            "an encoding name or .tiktoken file" if kind == "tiktoken" else "a directory or Hub id"
        )
        raise ValueError(f"tokenizer.name_or_path is required for kind={kind!r}: give {what}")
    if kind == "hf":
        return HFTokenizer.from_pretrained(os.path.expanduser(name))
    path = os.path.expanduser(name)
    if name.endswith(".tiktoken") or os.path.sep in name or os.path.isfile(path):
        return TiktokenTokenizer.from_file(path)
    return TiktokenTokenizer.from_name(name)


_PROBES = (
    "Hello, world! 123 ...",
    "\n\nHuman: Wie geht's? \u00e9\u00e8 \u4f60\u597d \U0001f600\n\nAssistant:",
    f"tabs\tand  spaces {EOS_TOKEN}",
)


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether token ids mean the same to both: same vocabulary size, EOS and pad ids, and the
    same ids for probe texts (ASCII, accents, CJK, emoji, whitespace, EOS text). A tokenizer
    saved from another (``Tokenizer.save``) compares equal to it."""
    if (a.vocab_size, a.eos_id, a.pad_id) != (b.vocab_size, b.eos_id, b.pad_id):
        return False
    return all(a.encode(text) == b.encode(text) for text in _PROBES)
