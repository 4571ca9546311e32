"""The real model of the `real` tier: builtin:smollm2-135m-instruct, converted from its GGUF,
loads with plain transformers and answers a sum."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.real


def test_converted_smollm2_loads_plainly_and_answers(real_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(real_model_dir)
    model = AutoModelForCausalLM.from_pretrained(real_model_dir).eval()
    assert model.config.vocab_size == 49152 and len(tok) == 49152
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"
    messages = [{"role": "user", "content": "What is 2 + 3? Give only the final number."}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False
        )
    reply = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "5" in reply, reply
