"""What a round samples from and checks: the prompt texts, the round's encoded prompt rows, and
the check that a rollout came back whole and fresh.

Shared by the PPO loop (``rlhf_ray.ppo.loop``), evaluation, ``rlhf-ray generate`` and the
preflight checks, so it stands below all of them.
"""

from __future__ import annotations

import torch

from rlhf_ray.config.ppo import Config
from rlhf_ray.data.chat_format import render_transcript
from rlhf_ray.data.prompts import load_prompt_set
from rlhf_ray.data.tokenization import Tokenizer, encode_prompts
from rlhf_ray.types import PromptBatch, Rollout, occurrences
from rlhf_ray.workers.interface import StaleWeightsError


class PromptTexts(list[str]):
    """The prompt texts; ``skipped`` lists the bad rows dropped (``data.on_bad_row: skip``)."""

    skipped: list[str] = []
    columns: list[dict] = []  # per prompt, its row's other fields (``PromptSet.columns``)


def build_prompts(cfg: Config, tokenizer: Tokenizer) -> PromptTexts:
    """The prompt texts, with the chat template applied if configured."""
    data = cfg.data
    loaded = load_prompt_set(
        data.prompts, data.prompt_field, data.split, data.format, data.on_bad_row
    )
    if data.chat_template:
        texts = PromptTexts(tokenizer.apply_chat(conv) for conv in loaded.conversations)
    elif loaded.format == "plain":
        texts = PromptTexts(conv[0]["content"] for conv in loaded.conversations)
    else:
        texts = PromptTexts(
            render_transcript(conv, add_generation_prompt=True) for conv in loaded.conversations
        )
    texts.skipped = loaded.skipped
    texts.columns = loaded.columns
    if loaded.skipped:
        print(
            f"[rlhf_ray] skipped {len(loaded.skipped)} bad data rows (data.on_bad_row: skip), "
            f"first: {loaded.skipped[0]}",
            flush=True,
        )
    return texts


def tokenize_prompts(
    tokenizer: Tokenizer,
    prompts: list[str],
    index: list[int],
    max_tokens: int,
    template_start: str | None = None,
) -> tuple[PromptBatch, int]:
    """The round's rows, encoded as the tokenizer does by default (BOS for Llama), each with
    its sample index (seeds its sampling) and its prompt row's columns (``PromptTexts``
    prompts); and how many prompts were cut to ``max_tokens``."""
    texts = [prompts[i] for i in index]
    ids, mask, truncated = encode_prompts(tokenizer, texts, max_tokens, template_start)
    prompt_index = torch.tensor(index, dtype=torch.long)
    columns = getattr(prompts, "columns", [])
    row_columns = [columns[i] for i in index] if columns else []
    batch = PromptBatch(ids, mask, prompt_index, texts, occurrences(prompt_index), row_columns)
    return batch, truncated


def check_rollout(rollout: Rollout, version: int, index: list[int]) -> None:
    """Refuse a round whose samples are stale, or not exactly one per requested prompt row
    (``index``: a prompt index per row, n rows per prompt with samples_per_prompt n)."""
    stale = (rollout.weight_version != version).nonzero().flatten().tolist()
    if stale:
        raise StaleWeightsError(f"{len(stale)} samples were not generated with weights v{version}")
    if rollout.prompt_index.tolist() != list(index):
        raise RuntimeError(
            f"rollout returned {len(rollout)} samples for {len(index)} prompts, "
            "not one per prompt in order: samples were lost or duplicated"
        )
