"""One way to encode a conversation in every stage: SFT sequences, reward-model pairs, PPO
prompts, eval prompts and the reward scorer all start as ``AutoTokenizer(dir)(text)`` does with
the saved tokenizer (BOS for a Llama-style one, nothing for a GPT-2-style one), with and
without a chat template; and a preference pair too long for ``max_tokens`` keeps its EOS."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from tokenizers.processors import TemplateProcessing
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from rlhf_ray.data.preference import PreferencePair
from rlhf_ray.data.stage_data import SFTExample, encode_pairs, encode_sft, reply_text
from rlhf_ray.data.tokenization import HFTokenizer, chat_template_start
from rlhf_ray.ppo.loop import tokenize_prompts

CORPUS = ["Human: how are you today? Assistant: fine, thanks for asking."] * 20 + [
    "The quick brown fox jumps over the lazy dog. 0123456789 !?,.:;'\"\n\n"
]
TEMPLATE = (  # a template that does not write BOS itself (Llama-3 style ones do: tested below)
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
BOS_TEMPLATE = "{{ bos_token }}" + TEMPLATE
CONVERSATION = [{"role": "user", "content": "how are you today?"}]


def _saved(tmp_path: Path, bos: bool, template: str | None) -> Path:
    """A byte-level BPE saved with ``save_pretrained``: Llama-style (a post-processor adds
    ``<s>``) or GPT-2-style (no BOS), with or without a chat template."""
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=alphabet, show_progress=False)
    backend.train_from_iterator(CORPUS, trainer)
    backend.add_special_tokens(["<s>", "</s>"])
    if bos:
        bos_id = backend.token_to_id("<s>")
        backend.post_processor = TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", bos_id)]
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", chat_template=template
    )
    directory = tmp_path / f"tok_{bos}_{template is not None}"
    tok.save_pretrained(str(directory))
    return directory


CASES = [
    pytest.param(True, None, id="llama-no-template"),
    pytest.param(True, TEMPLATE, id="llama-template"),
    pytest.param(True, BOS_TEMPLATE, id="llama-template-writes-bos"),
    pytest.param(False, None, id="gpt2-no-template"),
    pytest.param(False, TEMPLATE, id="gpt2-template"),
]


def _first(ids: torch.Tensor, mask: torch.Tensor) -> int:
    return int(ids[mask.bool()][0])


@pytest.mark.parametrize(("bos", "template"), CASES)
def test_sft_rm_and_ppo_sequences_start_as_transformers_encodes_the_text(tmp_path, bos, template):
    directory = _saved(tmp_path, bos, template)
    tok = HFTokenizer.from_pretrained(str(directory))
    plain = AutoTokenizer.from_pretrained(str(directory))  # what a user of the saved dir gets
    prompt_text, reply = reply_text(tok, CONVERSATION, "fine, thanks")
    # a template that writes BOS: transformers' documented way is add_special_tokens=False
    # (else it doubles BOS); everywhere else the default special tokens
    special = template != BOS_TEMPLATE
    expected = plain(prompt_text, add_special_tokens=special)["input_ids"]
    assert (expected[0] == tok.bos_id) == bos and expected.count(tok.bos_id) == int(bos)

    sft = encode_sft([SFTExample(CONVERSATION, "fine, thanks")], tok, 64, 48)
    pairs = encode_pairs([PreferencePair(CONVERSATION, "fine, thanks", "go away")], tok, 64, 48)
    ppo, _ = tokenize_prompts(tok, [prompt_text], [0], 48, chat_template_start(tok))
    firsts = {
        "sft": _first(sft.input_ids[0], sft.attention_mask[0]),
        "rm chosen": _first(pairs.chosen_ids[0], pairs.chosen_mask[0]),
        "rm rejected": _first(pairs.rejected_ids[0], pairs.rejected_mask[0]),
        "ppo prompt": _first(ppo.prompt_ids[0], ppo.prompt_mask[0]),
    }
    assert set(firsts.values()) == {expected[0]}, firsts
    ppo_ids = ppo.prompt_ids[0][ppo.prompt_mask[0].bool()].tolist()
    assert ppo_ids == expected
    # the reward model's sequence is what plain transformers gives for the whole text (the
    # claim of rlhf_ray/stages/reward_model.py's docstring)
    chosen = pairs.chosen_ids[0][pairs.chosen_mask[0].bool()].tolist()
    text = prompt_text + reply + plain.eos_token
    assert chosen == plain(text, add_special_tokens=special)["input_ids"]


@pytest.mark.parametrize(("bos", "template"), [CASES[0], CASES[3]])
def test_an_over_long_pair_keeps_its_eos_and_cuts_the_prompt_from_the_left(tmp_path, bos, template):
    tok = HFTokenizer.from_pretrained(str(_saved(tmp_path, bos, template)))
    prompt = [{"role": "user", "content": "the quick brown fox " * 20}]
    pair = PreferencePair(prompt, "fine, thanks for asking", "no")
    batch = encode_pairs([pair], tok, max_tokens=24, max_prompt_tokens=20)
    for ids, mask, reply in (
        (batch.chosen_ids, batch.chosen_mask, pair.chosen),
        (batch.rejected_ids, batch.rejected_mask, pair.rejected),
    ):
        real = ids[0][mask[0].bool()].tolist()
        assert len(real) <= 24 and real[-1] == tok.eos_id
        assert (real[0] == tok.bos_id) == bos  # BOS kept when the prompt is cut
        reply_ids = tok.encode(reply_text(tok, prompt, reply)[1])
        assert real[-1 - len(reply_ids) : -1] == reply_ids  # the whole reply
    # a reply too long even for an empty prompt: cut at its end, EOS still last
    long_pair = PreferencePair(prompt, "fine " * 40, "no")
    real = encode_pairs([long_pair], tok, 24, 20).chosen_ids[0].tolist()
    assert len(real) == 24 and real[-1] == tok.eos_id and (real[0] == tok.bos_id) == bos


@pytest.mark.parametrize(("bos", "template"), [CASES[1], CASES[4]])
def test_a_reward_model_with_its_own_template_reads_the_conversation_in_it(tmp_path, bos, template):
    """PPO's default prompts are HH transcripts; a reward model whose tokenizer has its own chat
    template was trained (train-rm) on that template's text, so the scorer re-renders."""
    from rlhf_ray.data.stage_data import render_for

    rm_tok = HFTokenizer.from_pretrained(str(_saved(tmp_path, bos, template)))
    transcript = "\n\nHuman: how are you today?\n\nAssistant: fine\n\nHuman: and now?\n\nAssistant:"
    prompt, reply = render_for(rm_tok, transcript, " still fine")
    turns = [
        {"role": "user", "content": "how are you today?"},
        {"role": "assistant", "content": "fine"},
        {"role": "user", "content": "and now?"},
    ]
    assert (prompt, reply) == reply_text(rm_tok, turns, "still fine")
    assert prompt == "<|user|>how are you today?<|assistant|>fine<|user|>and now?<|assistant|>"
    # the policy's own format, or a prompt that is not a transcript: kept as it is
    plain_tok = HFTokenizer.from_pretrained(str(_saved(tmp_path, bos, None)))
    assert render_for(plain_tok, transcript, " still fine") == (transcript, " still fine")
    assert render_for(rm_tok, "just text", " x") == ("just text", " x")
