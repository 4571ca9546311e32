"""The seam between the driver and the workers.

``run_ppo`` talks only to ``Workers``. Two implementations satisfy it: ``InProcessWorkers``
(plain objects, one process: tests and debugging) and ``rlhf_ray.distributed.RayWorkers``
(the same classes as Ray actors). Helpers here are shared by both so that they split work and
seed sampling identically: a round's rows are dealt to workers in whole chunks
(``shard_rows``) and each row is seeded by (seed, round, prompt index, sample index)
(``row_seeds``), so the samples do not depend on the pool size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from rlhf_ray.errors import UserError
from rlhf_ray.types import PPOBatch, PromptBatch, Rollout, Rows

# The sync check's probe: a fixed text whose log-probs a rollout worker and the policy learner
# must agree on after every weight sync (any tokenizer encodes it to a few dozen tokens).
PROBE_TEXT = "The quick brown fox jumps over the lazy dog. 0123456789, ok?"


class StaleWeightsError(RuntimeError):
    """A rollout worker produced samples with weights other than the round's version."""


class LearnerLostError(RuntimeError):
    """A learner rank died or did not answer within ``train.phase_timeout_s``: its group cannot
    go on (its peers wait in collectives), so the groups are rebuilt from a checkpoint."""


class SyncCheckError(UserError, RuntimeError):
    """A rollout worker's log-probs on the probe differ from the learner's after a sync."""


def probe_batch(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1, T)`` ids and mask of ``PROBE_TEXT``; score its tokens after the first."""
    ids = torch.tensor([tokenizer.encode(PROBE_TEXT)], dtype=torch.long)
    return ids, torch.ones_like(ids)


class Workers(Protocol):
    def sync(self, version: int) -> None:
        """Send the policy's current full weights to every rollout worker as ``version``."""

    def scale_rollout(self, num_workers: int) -> None:
        """Resize the rollout pool between rounds; new workers get the current weights first."""

    def generate(self, prompts: PromptBatch, round_index: int, version: int) -> Rollout:
        """Split ``prompts`` over the rollout pool; every sample carries ``version``."""

    def score(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """``ref_logprobs``, ``old_logprobs``, ``values`` (B, R; only with a critic), raw
        ``scores`` (B,) and ``outside_filter`` (B, R) bool: sampled tokens outside the policy's
        top-k / top-p set; ``full_logprobs`` (B, R): the old log-probs under the unfiltered
        distribution (``kl_logprobs``)."""

    def update(self, batch: PPOBatch, round_index: int) -> dict[str, float]:
        """PPO epochs on the policy (and, with a critic, value) learners; averaged stats."""

    def probe_sync(self, version: int) -> tuple[float, int]:
        """After a sync to ``version``: the max abs difference between the policy learner's and
        one rollout worker's log-probs of the probe sequence, and that worker's id (the worker
        checked rotates with the version)."""

    def info(self) -> dict[str, float]:
        """Per-round facts about the actor graph (e.g. ``rollout/num_workers``)."""

    def save(self, directory: Path, merged: bool = True) -> None:
        """Write ``policy/`` and, with a critic, ``value/`` (HF format) under ``directory``
        (a LoRA learner: ``<role>/adapter``, and the merged model when ``merged``)."""

    def save_state(self, directory: Path) -> None:
        """Write the learners' training state (weights and optimizers) for an exact resume."""

    def load_state(self, directory: Path) -> None:
        """Restore what ``save_state`` wrote."""

    def close(self) -> None:
        """Release every worker."""


def sampled_rollout(
    prompts: PromptBatch, out: dict[str, torch.Tensor], tokenizer, version: int, worker_id: int
) -> Rollout:
    """The ``Rollout`` of a rollout worker (either backend) from its sampler's output
    (``response_ids``, ``response_mask``, ``has_eos``, ``sampler_logprobs``): the prompts'
    rows, including their ``columns``, with the decoded responses and who sampled them."""
    responses = [
        tokenizer.decode(ids[m.bool()].tolist())
        for ids, m in zip(out["response_ids"], out["response_mask"], strict=True)
    ]
    n = len(prompts)
    return Rollout(
        prompt_ids=prompts.prompt_ids,
        prompt_mask=prompts.prompt_mask,
        prompt_index=prompts.prompt_index,
        sample_index=prompts.sample_index,
        response_ids=out["response_ids"],
        response_mask=out["response_mask"],
        has_eos=out["has_eos"],
        sampler_logprobs=out["sampler_logprobs"],
        weight_version=torch.full((n,), version, dtype=torch.long),
        prompts=list(prompts.prompts),
        responses=responses,
        worker_id=torch.full((n,), worker_id, dtype=torch.long),
        columns=list(prompts.columns),
    )


def kl_logprobs(scored: dict[str, torch.Tensor]) -> torch.Tensor:
    """The policy's log-probs the KL to the reference is taken with: the unfiltered,
    temperature-scaled ones (``full_logprobs``; ``models/logprobs.py`` says why), else, from a
    scorer that does not report them (no top-k / top-p: they are the same), ``old_logprobs``."""
    return scored.get("full_logprobs", scored["old_logprobs"])


def in_chunks(
    rollout: Rollout, size: int, device: torch.device, fn: Callable[[Rollout], torch.Tensor]
) -> torch.Tensor:
    """``fn`` over ``rollout`` in chunks of ``size`` rows moved to ``device`` (bounded memory
    for scoring forwards), results concatenated on the CPU."""
    return torch.cat(
        [
            fn(rollout.select(slice(i, i + size)).to(device)).cpu()
            for i in range(0, len(rollout), size)
        ]
    )


def split_rows(num_rows: int, num_parts: int) -> list[slice]:
    """Contiguous, near-equal slices covering ``range(num_rows)``; never an empty slice."""
    parts = min(num_parts, num_rows)
    bounds = [round(i * num_rows / parts) for i in range(parts + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(parts)]


def shard_rows(num_rows: int, num_workers: int, chunk_rows: int | None) -> list[slice]:
    """Contiguous shards of ``range(num_rows)``, one per worker (fewer if there are fewer
    chunks), made of whole chunks of ``chunk_rows`` rows counted from row 0 of the round
    (None: near-equal shards, each generated in one batch).

    With chunks, a worker generates its shard chunk by chunk, so each row is computed in the
    same chunk, beside the same rows, whatever the number of workers: the floats, and so the
    samples, do not depend on the pool size."""
    if chunk_rows is None:
        return split_rows(num_rows, num_workers) if num_rows else []
    chunks = split_rows(-(-num_rows // chunk_rows), num_workers) if num_rows else []
    return [slice(c.start * chunk_rows, min(c.stop * chunk_rows, num_rows)) for c in chunks]


def round_seed(seed: int, round_index: int) -> int:
    """The sampling seed of one round (rows derive theirs with ``row_seeds``)."""
    return (seed * 1_000_003 + round_index * 10_007) % (2**31)


def row_seeds(seed: int, prompt_index: torch.Tensor, sample_index: torch.Tensor) -> list[int]:
    """One sampling seed per row from (round seed, prompt index, sample index) only: never
    from the shard or the worker, so a row draws the same sample on any pool size."""
    return [
        int.from_bytes(hashlib.blake2b(f"{seed}/{p}/{s}".encode(), digest_size=8).digest()) >> 1
        for p, s in zip(prompt_index.tolist(), sample_index.tolist(), strict=True)
    ]


def mean_stats(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Average each stat over ranks (each rank saw the same number of minibatches)."""
    return {k: sum(s[k] for s in per_rank) / len(per_rank) for k in per_rank[0]}


class StageWorkers(Protocol):
    """What ``stages.run_sft`` and ``stages.run_train_rm`` talk to: one learner group
    (``workers.stage_learners``), in-process (``InProcessStage``) or on Ray (``RayStage``)."""

    def load_data(self, train: Rows, eval_set: Rows | None) -> None:
        """Give every rank the tokenized train set and the held-out set (if any)."""

    def train_step(self, epoch: int, step: int) -> dict[str, float]:
        """One optimizer step on the step's global minibatch; stats averaged over ranks."""

    def evaluate(self, split: str) -> dict[str, float]:
        """Loss and stats over a whole split ("train" or "eval")."""

    def scores(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Reward learners only: chosen and rejected scores ``(N,)`` of a split."""

    def save(self, directory: Path) -> None:
        """Write the model in Hugging Face format to ``directory``."""

    def close(self) -> None:
        """Release the learners."""

    def save_state(self, directory: Path) -> None:
        """Write the training state (weights, optimizer) of every rank to ``directory``."""

    def load_state(self, directory: Path) -> None:
        """Restore the training state ``save_state`` wrote."""


def sync_bytes(sent: int, full: int) -> dict[str, float]:
    """The per-sync figures: ``sync/bytes`` sent (adapters only with LoRA) and
    ``sync/full_bytes``, what sending every weight would take."""
    return {"sync/bytes": float(sent), "sync/full_bytes": float(full)}


def check_sync(
    workers: Workers, sync_cfg, version: int, dtype: str = "float32"
) -> dict[str, float]:
    """The sync check after a sync to ``version`` of ``dtype`` weights:
    ``sync/logprob_max_abs_diff``, or a ``SyncCheckError`` above ``sync_cfg.tolerance(dtype)``."""
    diff, worker = workers.probe_sync(version)
    limit = sync_cfg.tolerance(dtype)
    if not diff <= limit:  # NaN fails too
        raise SyncCheckError(
            f"weight sync check failed after the sync to v{version}: rollout worker {worker} and "
            f"the policy learner give log-probs of the probe sequence that differ by up to "
            f"{diff:.3g} (> sync.max_logprob_diff {limit:g} for {dtype}), so the worker "
            "does not sample from the weights the learner trains. Check that both build the same "
            "model (dtype, architecture) and that the sync loaded every tensor."
        )
    return {"sync/logprob_max_abs_diff": diff}
