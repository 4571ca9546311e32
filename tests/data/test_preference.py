"""Preference pairs: HH-RLHF transcript parsing (hand examples and the real file), plain rows."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import datasets
import pytest

from rlhf_ray.data import (
    DEFAULT_SYSTEM,
    PreferencePair,
    hh_pair,
    load_preferences,
    parse_hh_transcript,
    render_transcript,
)

REPO = Path(__file__).resolve().parents[2]
HH_CANDIDATES = [
    REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz",
    REPO / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz",
]
HH_FILE = next((p for p in HH_CANDIDATES if p.is_file()), None)
needs_hh = pytest.mark.skipif(
    HH_FILE is None,
    reason=f"HH-RLHF sample not found at {HH_CANDIDATES[0]} (shared/ not beside the repo)",
)

CHOSEN = (
    "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water, salt and yeast.\n\n"
    "Human: And then?\n\nAssistant: Knead it, let it rise, and bake at 230°C."
)
REJECTED = (
    "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water, salt and yeast.\n\n"
    "Human: And then?\n\nAssistant: Buy some instead."
)


@pytest.fixture(autouse=True)
def isolated_datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    with (
        gzip.open(path, "wt", encoding="utf-8")
        if path.suffix == ".gz"
        else open(path, "w", encoding="utf-8") as fh
    ):
        fh.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def test_parse_hh_transcript_splits_and_strips_turns():
    assert parse_hh_transcript(CHOSEN) == [
        {"role": "user", "content": "How do I bake bread?"},
        {"role": "assistant", "content": "Mix flour, water, salt and yeast."},
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": "Knead it, let it rise, and bake at 230°C."},
    ]


def test_parse_keeps_inner_blank_lines_and_merges_repeated_roles():
    text = "\n\nHuman: List two.\n\nAssistant: 1. a\n\n2. b\n\nAssistant: Done."
    assert parse_hh_transcript(text) == [
        {"role": "user", "content": "List two."},
        {"role": "assistant", "content": "1. a\n\n2. b\n\nDone."},
    ]


def test_parse_rejects_text_without_turns_or_with_a_preamble():
    with pytest.raises(ValueError, match="no '"):
        parse_hh_transcript("just some text")
    with pytest.raises(ValueError, match="before the first"):
        parse_hh_transcript("preamble\n\nHuman: hi\n\nAssistant: yo")


def test_hh_pair_shared_prefix_is_the_prompt_after_a_system_line():
    pair = hh_pair(CHOSEN, REJECTED)
    assert pair == PreferencePair(
        prompt=[{"role": "system", "content": DEFAULT_SYSTEM}] + parse_hh_transcript(CHOSEN)[:-1],
        chosen="Knead it, let it rise, and bake at 230°C.",
        rejected="Buy some instead.",
    )
    assert hh_pair(CHOSEN, REJECTED, system=None).prompt[0]["role"] == "user"
    # Rendering the prompt (without system) gives back the original transcript prefix.
    prefix = render_transcript(hh_pair(CHOSEN, REJECTED, system=None).prompt)
    assert CHOSEN.startswith(prefix) and REJECTED.startswith(prefix)


def test_hh_pair_errors():
    with pytest.raises(ValueError, match="does not end with an Assistant turn"):
        hh_pair(CHOSEN + "\n\nHuman: more?", REJECTED)
    with pytest.raises(ValueError, match="do not share the prompt: they differ at turn 3"):
        hh_pair(CHOSEN, REJECTED.replace("And then?", "What next?"))
    with pytest.raises(ValueError, match="no Human turn"):
        hh_pair("\n\nAssistant: hi", "\n\nAssistant: yo")


@needs_hh
def test_every_row_of_the_real_hh_file_parses():
    pairs, skipped = load_preferences(str(HH_FILE))
    assert (len(pairs), skipped) == (2312, 0)
    for pair in pairs:
        assert pair.prompt[0] == {"role": "system", "content": DEFAULT_SYSTEM}
        roles = [m["role"] for m in pair.prompt[1:]]
        assert roles[0] == "user" and roles[-1] == "user"
        assert all(a != b for a, b in zip(roles, roles[1:], strict=False))  # turns alternate
        assert all(m["content"] for m in pair.prompt)
    # Known quirks of this split: 4 preferred replies are empty; some rows differ only in
    # replies that themselves contain an "Assistant:" turn (merged, so the prefix still matches).
    assert sum(p.chosen == "" for p in pairs) == 4
    assert pairs[0].chosen.startswith("No, sorry!")


def test_plain_rows_with_string_or_message_prompts(tmp_path):
    rows = [
        {"prompt": " Name a color. ", "chosen": "Blue.", "rejected": "No."},
        {
            "prompt": [{"role": "user", "content": "Hi"}],
            "chosen": "Hello!",
            "rejected": "...",
        },
    ]
    path = write_jsonl(tmp_path / "plain.jsonl.gz", rows[:1])
    pairs, skipped = load_preferences(str(path), system=None)
    assert skipped == 0
    assert pairs == [
        PreferencePair(
            prompt=[{"role": "user", "content": "Name a color."}], chosen="Blue.", rejected="No."
        )
    ]
    path = write_jsonl(tmp_path / "messages.jsonl", rows[1:])
    (pair,), _ = load_preferences(str(path), fmt="plain")
    assert pair.prompt == [
        {"role": "system", "content": DEFAULT_SYSTEM},
        {"role": "user", "content": "Hi"},
    ]


def test_bad_rows_name_file_and_line_or_are_counted_when_skipping(tmp_path):
    rows = [
        {"chosen": CHOSEN, "rejected": REJECTED},
        {"chosen": CHOSEN, "rejected": "no transcript here"},
        {"chosen": CHOSEN, "rejected": REJECTED},
        {"chosen": CHOSEN + "\n\nHuman: ?", "rejected": REJECTED},
    ]
    path = write_jsonl(tmp_path / "hh_rows.jsonl.gz", rows)
    with pytest.raises(ValueError, match=r"hh_rows\.jsonl\.gz, line 2: no '"):
        load_preferences(str(path))
    pairs, skipped = load_preferences(str(path), skip_bad_rows=True)
    assert (len(pairs), skipped) == (2, 2)


def test_plain_bad_row_and_missing_columns(tmp_path):
    rows = [
        {"prompt": "ok", "chosen": "a", "rejected": "b"},
        {"prompt": "", "chosen": "a", "rejected": "b"},
    ]
    path = write_jsonl(tmp_path / "plain_bad.jsonl", rows)
    with pytest.raises(ValueError, match=r"plain_bad\.jsonl, line 2: field 'prompt' is empty"):
        load_preferences(str(path))
    path = write_jsonl(tmp_path / "cols.jsonl", [{"prompt": "p", "chosen": "c"}])
    with pytest.raises(ValueError, match=r"cols\.jsonl.*missing \['rejected'\]"):
        load_preferences(str(path))
    path = write_jsonl(tmp_path / "nothing.jsonl", [{"chosen": "x", "rejected": "y"}])
    with pytest.raises(ValueError, match="no usable preference pairs"):
        load_preferences(str(path), skip_bad_rows=True)
