"""Seeded, resumable prompt index batches.

The sampler walks an endless stream made of one random permutation of ``range(num_prompts)``
per epoch (epoch ``e`` uses a ``torch.Generator`` seeded from ``(seed, e)``). Every batch has
exactly ``batch_size`` indices: when fewer than ``batch_size`` remain in the current epoch, the
batch takes that remainder and is completed from the start of the next epoch's permutation.
So each epoch visits every index exactly once, nothing is dropped, and batch shapes stay fixed;
a batch at an epoch boundary may repeat an index (once from each epoch).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["PromptSampler"]

_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: keeps (seed, epoch) pairs apart


class PromptSampler:
    """Yields batches of prompt indices; ``state_dict`` / ``load_state_dict`` resume exactly."""

    def __init__(self, num_prompts: int, batch_size: int, seed: int = 0) -> None:
        if num_prompts <= 0:
            raise ValueError(f"num_prompts must be > 0, got {num_prompts} (no prompts loaded?)")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.num_prompts = num_prompts
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        """Epoch of the next index to hand out."""
        self.cursor = 0
        """Position of the next index within that epoch's permutation."""
        self._perm: list[int] | None = None

    def _permutation(self) -> list[int]:
        if self._perm is None:
            generator = torch.Generator().manual_seed((self.seed * _SEED_MIX + self.epoch) % 2**63)
            self._perm = torch.randperm(self.num_prompts, generator=generator).tolist()
        return self._perm

    def next_batch(self) -> list[int]:
        """The next ``batch_size`` indices (see the module docstring at epoch boundaries)."""
        batch: list[int] = []
        while len(batch) < self.batch_size:
            take = min(self.batch_size - len(batch), self.num_prompts - self.cursor)
            batch.extend(self._permutation()[self.cursor : self.cursor + take])
            self.cursor += take
            if self.cursor == self.num_prompts:
                self.epoch, self.cursor, self._perm = self.epoch + 1, 0, None
        return batch

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the same stream (plain ints, JSON-serialisable)."""
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "num_prompts": self.num_prompts,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; raises ValueError if it came from other data or seed.

        ``batch_size`` may differ from the saving run's: the stream of indices is the same.
        """
        for key in ("num_prompts", "seed"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state was saved with {key}={state[key]}, but this sampler has "
                    f"{key}={getattr(self, key)}: resume with the same prompts and seed"
                )
        epoch, cursor = int(state["epoch"]), int(state["cursor"])
        if epoch < 0 or not 0 <= cursor < self.num_prompts:
            raise ValueError(f"invalid sampler state: epoch={epoch}, cursor={cursor}")
        self.epoch, self.cursor, self._perm = epoch, cursor, None
