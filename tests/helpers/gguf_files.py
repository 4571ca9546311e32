"""Tiny GGUF files written with the ``gguf`` package's writer: a 2-layer Llama whose tokenizer
(a byte-level BPE trained here, ChatML special tokens and template) transformers can load."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1 (BOS), 2 (EOS, pad)


def tiny_bpe() -> tuple[list[str], list[str]]:
    """A byte-level BPE's tokens (in id order) and merges, trained on one sentence."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["What is 2 + 3? Give only the final number. It is 5."] * 20, trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def write_tiny_gguf(
    path: Path, arch: str = "llama", quant: str = "Q8_0", seed: int = 0, hidden: int = 32
) -> Path:
    """A 2-layer Llama GGUF file: its matrices quantized as ``quant`` (a GGML type name; 1-D
    norms stay F32, as llama.cpp keeps them), tied embeddings (no ``output.weight``)."""
    import gguf

    qtype = gguf.GGMLQuantizationType[quant]
    tokens, merges = tiny_bpe()
    vocab, layers, heads, kv_heads, ffn = len(tokens), 2, 4, 2, 64
    kv = kv_heads * hidden // heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(layers)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * vocab)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_chat_template(CHATML)
    rng = np.random.default_rng(seed)

    def tensor(name: str, shape: tuple[int, ...]) -> None:
        values = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if len(shape) == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, values)
        elif qtype == gguf.GGMLQuantizationType.I8:  # a type gguf stores but cannot dequantize
            writer.add_tensor(name, (values * 100).astype(np.int8))
        else:
            data = gguf.quants.quantize(values, qtype)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)

    tensor("token_embd.weight", (vocab, hidden))
    for i in range(layers):
        for name, shape in (
            ("attn_norm", (hidden,)),
            ("ffn_norm", (hidden,)),
            ("attn_q", (hidden, hidden)),
            ("attn_k", (kv, hidden)),
            ("attn_v", (kv, hidden)),
            ("attn_output", (hidden, hidden)),
            ("ffn_gate", (ffn, hidden)),
            ("ffn_up", (ffn, hidden)),
            ("ffn_down", (hidden, ffn)),
        ):
            tensor(f"blk.{i}.{name}.weight", shape)
    tensor("output_norm.weight", (hidden,))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_wheel(path: Path, member: str, gguf_file: Path) -> Path:
    """A zip (a wheel's format) holding ``gguf_file`` as ``member``."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.write(gguf_file, member)
    return path
