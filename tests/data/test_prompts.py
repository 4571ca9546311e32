"""Prompt loading: bundled prompts, local files in several formats, HH transcripts, bad rows."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import datasets
import pandas as pd
import pytest

from rlhf_ray.data import load_prompt_conversations, load_prompts


@pytest.fixture(autouse=True)
def isolated_datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def write_jsonl(path: Path, rows: list[dict], gz: bool = False) -> Path:
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


ROWS = [{"question": f"  Question number {i}?  ", "id": i} for i in range(5)]
EXPECTED = [f"Question number {i}?" for i in range(5)]


def test_builtin_prompts_are_many_distinct_short_strings():
    prompts = load_prompts("builtin")
    assert len(prompts) >= 200
    assert len(set(prompts)) == len(prompts)
    assert all(isinstance(p, str) and 0 < len(p) < 200 and p == p.strip() for p in prompts)
    assert load_prompts() == prompts  # builtin is the default


def test_builtin_conversations_are_single_user_turns_with_optional_system():
    conversations = load_prompt_conversations("builtin", system="Be kind.")
    assert conversations[0][0] == {"role": "system", "content": "Be kind."}
    assert conversations[0][1]["role"] == "user"
    assert all(len(c) == 2 for c in conversations)


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv"])
def test_local_files_with_a_custom_field(tmp_path, suffix):
    path = tmp_path / f"prompts{suffix}"
    if suffix in (".jsonl", ".jsonl.gz"):
        write_jsonl(path, ROWS, gz=suffix.endswith(".gz"))
    elif suffix == ".json":
        path.write_text(json.dumps(ROWS), encoding="utf-8")
    elif suffix == ".parquet":
        pd.DataFrame(ROWS).to_parquet(path)
    else:
        pd.DataFrame(ROWS).to_csv(path, index=False)
    assert load_prompts(str(path), field="question") == EXPECTED


def test_save_to_disk_directory_and_dataset_dict_split(tmp_path):
    table = datasets.Dataset.from_list(ROWS)
    table.save_to_disk(str(tmp_path / "single"))
    assert load_prompts(str(tmp_path / "single"), field="question") == EXPECTED
    datasets.DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(
        str(tmp_path / "dict")
    )
    assert load_prompts(str(tmp_path / "dict"), field="question", split="test") == EXPECTED[:1]
    with pytest.raises(ValueError, match="no split 'validation'"):
        load_prompts(str(tmp_path / "dict"), field="question", split="validation")


def test_empty_prompt_names_file_field_and_line(tmp_path):
    rows = [{"prompt": "fine"}, {"prompt": "also fine"}, {"prompt": "   "}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 3: field 'prompt' is empty"):
        load_prompts(str(path))


def test_missing_field_in_one_row_names_its_line_counting_blank_lines(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"other": "b"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"gaps\.jsonl, line 3: field 'prompt' is missing"):
        load_prompts(str(path))


def test_missing_column_and_invalid_json_are_clear_errors(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    with pytest.raises(ValueError, match=r"p\.jsonl.*no field 'prompt'.*question"):
        load_prompts(str(path))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "ok"}\n{"prompt": oops}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.jsonl, line 2: invalid JSON"):
        load_prompts(str(broken))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_prompts(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="fmt"):
        load_prompts(str(path), fmt="chatml")


def test_unknown_hub_id_offline_is_a_clear_error():
    with pytest.raises(ValueError, match="not a local file or directory"):
        load_prompts("nobody-owner/no-such-dataset-xyz")


HH_ROWS = [
    {
        "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant: Apple.",
        "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant: No.",
    },
    {
        "chosen": "\n\nHuman: Say hi\n\nAssistant: Hi!",
        "rejected": "\n\nHuman: Say hi\n\nAssistant: Go away.",
    },
]


def test_hh_rows_are_detected_and_give_the_shared_prefix(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", HH_ROWS)
    assert load_prompts(str(path)) == [
        "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant:",
        "\n\nHuman: Say hi\n\nAssistant:",
    ]
    assert load_prompt_conversations(str(path))[1] == [{"role": "user", "content": "Say hi"}]
    # An explicit fmt="hh" with single-turn prompts still renders transcripts.
    assert load_prompts(str(path), fmt="hh")[1] == "\n\nHuman: Say hi\n\nAssistant:"


def test_hh_row_with_different_prefixes_names_the_line(tmp_path):
    rows = HH_ROWS + [
        {"chosen": "\n\nHuman: A\n\nAssistant: B", "rejected": "\n\nHuman: X\n\nAssistant: B"}
    ]
    path = write_jsonl(tmp_path / "hh_bad.jsonl", rows)
    with pytest.raises(ValueError, match=r"hh_bad\.jsonl, line 3: .*do not share the prompt"):
        load_prompts(str(path))
