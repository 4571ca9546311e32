"""Typed batch containers passed between the driver and the workers.

Shapes: ``B`` rows (one sample per prompt), ``P`` prompt tokens (left-padded), ``R`` response
tokens (exactly ``rollout.max_new_tokens``, pad after the first EOS).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, TypeVar

import torch

T = TypeVar("T", bound="Rows")


class Rows:
    """Row-wise slicing and concatenation of a dataclass of ``(B, ...)`` tensors / lists."""

    def __len__(self) -> int:
        first = getattr(self, fields(self)[0].name)  # type: ignore[arg-type]
        return len(first)

    def select(self: T, index: torch.Tensor | slice | list[int]) -> T:
        """The rows ``index`` (a slice, an index tensor, a bool row mask or a list of ints)."""
        if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
            index = index.nonzero().flatten()  # a row mask selects the rows where it is True
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long)
        values: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                values[f.name] = value[index]
            elif isinstance(value, list):
                values[f.name] = (
                    value[index] if isinstance(index, slice) else [value[i] for i in index.tolist()]
                )
            else:
                values[f.name] = value
        return replace(self, **values)  # type: ignore[type-var]

    def to(self: T, device: torch.device | str) -> T:
        """The same rows with every tensor on ``device``."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)  # type: ignore[arg-type]
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)  # type: ignore[type-var]

    @classmethod
    def concat(cls: type[T], parts: list[T]) -> T:
        values: dict[str, Any] = {}
        for f in fields(cls):  # type: ignore[arg-type]
            items = [getattr(p, f.name) for p in parts]
            if isinstance(items[0], torch.Tensor):
                values[f.name] = torch.cat(items)
            elif isinstance(items[0], list):
                values[f.name] = [x for item in items for x in item]
            else:
                if any(item != items[0] for item in items):
                    raise ValueError(f"cannot concatenate batches with different {f.name}")
                values[f.name] = items[0]
        return cls(**values)


def occurrences(prompt_index: torch.Tensor) -> torch.Tensor:
    """``(B,)`` occurrence number of each row's prompt index among the rows before it: 0 for
    the first row with prompt index p, 1 for the second, ... (``[7, 3, 7, 7] -> [0, 0, 1, 2]``).
    With ``prompt_index`` it names a sample of the round whatever the rows' split."""
    seen: dict[int, int] = {}
    out = []
    for p in prompt_index.tolist():
        out.append(seen.get(p, 0))
        seen[p] = out[-1] + 1
    return torch.tensor(out, dtype=torch.long)


def _no_rows() -> torch.Tensor:
    return torch.empty(0, dtype=torch.long)


def _per_row(name: str, value: Any, rows: int, what: str) -> bool:
    """Whether a per-row field was given (not left empty); one of the wrong length raises,
    naming both lengths (a silent default would hide a misalignment)."""
    if len(value) == 0:
        return rows == 0
    if len(value) != rows:
        raise ValueError(f"{what}: {name} has {len(value)} entries for {rows} rows")
    return True


@dataclass
class PromptBatch(Rows):
    """A round's prompts, tokenized on the driver."""

    prompt_ids: torch.Tensor  # (B, P) long, left-padded
    prompt_mask: torch.Tensor  # (B, P)
    prompt_index: torch.Tensor  # (B,) position of each prompt in the dataset
    prompts: list[str]
    # (B,) occurrence number of the row's prompt index in the round (``occurrences``); with
    # prompt_index and (seed, round) it seeds the row's sampling. Default: from prompt_index.
    sample_index: torch.Tensor = field(default_factory=_no_rows)
    # (B,) the prompt row's other fields (``PromptSet.columns``), for the reward. Default: {}.
    columns: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        rows = len(self.prompt_index)
        if not _per_row("sample_index", self.sample_index, rows, "PromptBatch"):
            self.sample_index = occurrences(self.prompt_index)
        if not _per_row("columns", self.columns, rows, "PromptBatch"):
            self.columns = [{} for _ in range(rows)]


@dataclass
class Rollout(Rows):
    """Sampled responses with everything needed to score and train on them."""

    prompt_ids: torch.Tensor  # (B, P)
    prompt_mask: torch.Tensor  # (B, P)
    prompt_index: torch.Tensor  # (B,)
    response_ids: torch.Tensor  # (B, R), pad after the first EOS
    response_mask: torch.Tensor  # (B, R), 1 up to and including the first EOS
    has_eos: torch.Tensor  # (B,) bool
    sampler_logprobs: torch.Tensor  # (B, R), from the rollout worker
    weight_version: torch.Tensor  # (B,) weight version the sample was generated with
    prompts: list[str]
    responses: list[str]
    sample_index: torch.Tensor = field(default_factory=_no_rows)  # (B,) as in PromptBatch
    worker_id: torch.Tensor = field(default_factory=_no_rows)  # (B,) the rollout worker's id
    columns: list[dict[str, Any]] = field(default_factory=list)  # (B,) as in PromptBatch

    def __post_init__(self) -> None:
        rows = len(self.prompt_index)
        if not _per_row("sample_index", self.sample_index, rows, "Rollout"):
            self.sample_index = occurrences(self.prompt_index)
        if not _per_row("columns", self.columns, rows, "Rollout"):
            self.columns = [{} for _ in range(rows)]
        if len(self.worker_id) != len(self.prompt_index):  # not told: unknown (-1)
            self.worker_id = torch.full_like(self.prompt_index, -1)

    @property
    def prompt_len(self) -> int:
        return self.prompt_ids.shape[1]

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)


@dataclass
class PPOBatch(Rows):
    """What the learners train on: a rollout plus old logprobs/values and advantages."""

    input_ids: torch.Tensor  # (B, P + R)
    attention_mask: torch.Tensor  # (B, P + R)
    response_mask: torch.Tensor  # (B, R)
    old_logprobs: torch.Tensor  # (B, R)
    old_values: torch.Tensor  # (B, R), zeros without a critic
    advantages: torch.Tensor  # (B, R)
    returns: torch.Tensor  # (B, R)
    ref_logprobs: torch.Tensor  # (B, R), for ppo.kl_in_loss
    prompt_len: int


@dataclass
class SFTBatch(Rows):
    """Supervised sequences (prompt + reply + EOS), left-padded; the loss reads ``loss_mask``."""

    input_ids: torch.Tensor  # (B, T) long, left-padded
    attention_mask: torch.Tensor  # (B, T)
    loss_mask: torch.Tensor  # (B, T) 1 on reply tokens (and the EOS closing the reply)


@dataclass
class PairBatch(Rows):
    """Preference pairs: the chosen and rejected sequences, left-padded to one width ``T``."""

    chosen_ids: torch.Tensor  # (B, T)
    chosen_mask: torch.Tensor  # (B, T)
    rejected_ids: torch.Tensor  # (B, T)
    rejected_mask: torch.Tensor  # (B, T)
