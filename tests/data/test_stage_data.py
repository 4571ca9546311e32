"""SFT and preference examples: formats, the held-out split, and what the loss mask covers."""

import json

import pytest

from rlhf_ray.data.preference import PreferencePair
from rlhf_ray.data.sources import BUILTIN_HH_RLHF
from rlhf_ray.data.stage_data import (
    SFTExample,
    encode_pairs,
    encode_sft,
    held_out_split,
    load_pairs,
    load_sft_examples,
)
from rlhf_ray.data.tokenization import TiktokenTokenizer

TOK = TiktokenTokenizer.byte_level()  # one token per byte: easy to count by hand
HH = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: fine, thanks"


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_sft_formats_give_the_same_example(tmp_path):
    want = SFTExample(
        prompt=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "how are you?"},
        ],
        response="fine, thanks",
    )
    hh, _ = load_sft_examples(_jsonl(tmp_path / "hh.jsonl", [{"chosen": HH, "rejected": HH}]))
    messages = [*want.prompt, {"role": "assistant", "content": "fine, thanks"}]
    chat, _ = load_sft_examples(_jsonl(tmp_path / "m.jsonl", [{"messages": messages}]))
    assert hh == chat == [want]
    plain, _ = load_sft_examples(
        _jsonl(tmp_path / "p.jsonl", [{"prompt": " why? ", "response": "because"}])
    )
    assert plain == [SFTExample([{"role": "user", "content": "why?"}], "because")]


def test_bad_sft_row_names_the_line_or_is_skipped(tmp_path):
    path = _jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "x"}] * 2}])
    with pytest.raises(ValueError, match=r"m.jsonl, line 1: the last message must be"):
        load_sft_examples(path + "")
    bad = _jsonl(tmp_path / "b.jsonl", [{"chosen": HH}, {"chosen": "no turns"}])
    examples, skipped = load_sft_examples(bad, skip_bad_rows=True)
    assert (len(examples), skipped) == (1, 1)


def test_loss_mask_covers_exactly_the_reply_and_eos():
    examples = [
        SFTExample([{"role": "user", "content": "ab"}], "xyz"),
        SFTExample([{"role": "user", "content": "a much longer prompt"}], "q"),
    ]
    batch = encode_sft(examples, TOK, max_tokens=64, max_prompt_tokens=48)
    for row, ex in enumerate(examples):
        ids = batch.input_ids[row][batch.attention_mask[row].bool()].tolist()
        reply = batch.input_ids[row][batch.loss_mask[row].bool()].tolist()
        prompt_text = f"\n\nHuman: {ex.prompt[0]['content']}\n\nAssistant:"
        assert TOK.decode(ids[: len(ids) - len(reply)]) == prompt_text
        assert reply == TOK.encode(" " + ex.response) + [TOK.eos_id]
    # padding is on the left and never in the loss
    assert batch.attention_mask[0, 0] == 0 and batch.loss_mask[0, 0] == 0


def test_long_sequences_keep_the_prompt_head_and_end_and_the_reply_start():
    ex = SFTExample([{"role": "user", "content": "p" * 50}], "r" * 50)
    batch = encode_sft([ex], TOK, max_tokens=30, max_prompt_tokens=10)
    text = TOK.decode(batch.input_ids[0])
    assert batch.input_ids.shape == (1, 30)
    # 10 prompt tokens as PPO keeps them: the template's start, then the prompt's last ones;
    # the reply cut at the end
    assert text == "\n\nHuman:" + "t:" + " " + "r" * 19
    assert int(batch.loss_mask.sum()) == 20


def test_pairs_share_one_width_and_end_with_eos():
    pairs = [PreferencePair([{"role": "user", "content": "q"}], "yes", "no, not at all")]
    batch = encode_pairs(pairs, TOK, max_tokens=64, max_prompt_tokens=32)
    assert batch.chosen_ids.shape == batch.rejected_ids.shape
    assert batch.chosen_ids[0, -1] == batch.rejected_ids[0, -1] == TOK.eos_id
    assert TOK.decode(batch.chosen_ids[0]).endswith("Assistant: yes")


def test_held_out_split_is_seeded_and_disjoint():
    train, held = held_out_split(100, 0.1, seed=3)
    assert len(held) == 10 and sorted(train + held) == list(range(100))
    assert held_out_split(100, 0.1, seed=3) == (train, held)
    assert held_out_split(100, 0.1, seed=4)[1] != held
    assert held_out_split(5, 0.0, seed=0) == ([0, 1, 2, 3, 4], [])


def test_bundled_hh_sample_has_300_pairs_without_a_system_line():
    pairs, skipped = load_pairs(BUILTIN_HH_RLHF, "auto", "train", False)
    assert (len(pairs), skipped) == (300, 0)
    assert all(p.prompt[0]["role"] == "user" and p.chosen != p.rejected for p in pairs)
    examples, _ = load_sft_examples(BUILTIN_HH_RLHF)
    assert [e.response for e in examples] == [p.chosen for p in pairs]
