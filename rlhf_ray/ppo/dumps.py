"""Rollout dumps: what one round sampled and trained on, to read and to replay.

With ``logging.dump_rollouts_every: K`` every round with ``round % K == 0`` writes

- ``RUN/rollouts/round_XXXXXX.jsonl``: one row per sample: prompt and response text, their token
  ids, the prompt row's columns, the raw score (and its parts: ``main`` and each of
  ``reward.terms``) and the shaped score, the summed KL to the reference, the KL-penalised return
  (shaped score minus beta times the summed per-token KL, i.e. the sum of the per-token rewards
  GAE saw), a summary of the advantages, the weight version and the rollout worker;
- ``RUN/rollouts/round_XXXXXX.safetensors``: the round's ``PPOBatch`` tensors exactly as the
  learners received them (non-tensor fields as JSON metadata), which ``rlhf-ray replay`` trains on.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rlhf_ray.algo import kl_penalized_rewards
from rlhf_ray.types import PPOBatch, Rollout
from rlhf_ray.workers.interface import kl_logprobs


def dump_due(every: int, round_index: int) -> bool:
    return every > 0 and round_index % every == 0


def dump_paths(run_dir: Path, round_index: int) -> tuple[Path, Path]:
    """``(rows .jsonl, batch .safetensors)`` of a round."""
    stem = run_dir / "rollouts" / f"round_{round_index:06d}"
    return stem.with_suffix(".jsonl"), stem.with_suffix(".safetensors")


def _masked_summary(x: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    valid = x[mask.bool()]
    if valid.numel() == 0:
        return {"mean": 0.0, "min": 0.0, "max": 0.0}
    return {"mean": float(valid.mean()), "min": float(valid.min()), "max": float(valid.max())}


def sample_rows(
    round_index: int,
    rollout: Rollout,
    scored: dict[str, torch.Tensor],
    batch: PPOBatch,
    shaped_scores: torch.Tensor,
    kl_coef: float,
    kl_estimator: str,
) -> list[dict[str, Any]]:
    """One JSON-ready dict per sample of the round."""
    mask = rollout.response_mask
    rewards, kl = kl_penalized_rewards(
        shaped_scores, kl_logprobs(scored), scored["ref_logprobs"], mask, kl_coef, kl_estimator
    )
    rows = []
    for i in range(len(rollout)):
        m = mask[i].bool()
        rows.append(
            {
                "round": round_index,
                "row": i,
                "prompt_index": int(rollout.prompt_index[i]),
                "prompt": rollout.prompts[i],
                "response": rollout.responses[i],
                "prompt_ids": rollout.prompt_ids[i][rollout.prompt_mask[i].bool()].tolist(),
                "response_ids": rollout.response_ids[i][m].tolist(),
                "has_eos": bool(rollout.has_eos[i]),
                "score": float(scored["scores"][i]),
                "shaped_score": float(shaped_scores[i]),
                "kl": float(kl[i].sum()),
                "kl_penalized_return": float(rewards[i].sum()),
                "advantage": _masked_summary(batch.advantages[i], mask[i]),
                "value_mean": _masked_summary(batch.old_values[i], mask[i])["mean"],
                "weight_version": int(rollout.weight_version[i]),
                "worker": int(rollout.worker_id[i]),
                "columns": rollout.columns[i],
                "score_parts": {
                    k.removeprefix("reward_term/"): float(v[i])
                    for k, v in scored.items()
                    if k.startswith("reward_term/")
                },
            }
        )
    return rows


def dump_round(
    run_dir: Path,
    round_index: int,
    rollout: Rollout,
    scored: dict[str, torch.Tensor],
    batch: PPOBatch,
    shaped_scores: torch.Tensor,
    kl_coef: float,
    kl_estimator: str,
) -> Path:
    """Write the round's sample rows and its PPO batch; returns the ``.jsonl`` path."""
    rows_path, batch_path = dump_paths(run_dir, round_index)
    rows_path.parent.mkdir(parents=True, exist_ok=True)
    rows = sample_rows(round_index, rollout, scored, batch, shaped_scores, kl_coef, kl_estimator)
    tmp = rows_path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(row, default=str) + "\n" for row in rows))
    tmp.rename(rows_path)
    save_ppo_batch(batch, batch_path, {"round": round_index, "kl_coef": kl_coef})
    return rows_path


def save_ppo_batch(batch: PPOBatch, path: Path, info: dict[str, Any] | None = None) -> None:
    """Every tensor field of ``batch`` bit-exactly (safetensors, no pickle); the other fields
    and ``info`` as JSON metadata."""
    tensors, other = {}, {}
    for f in fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, torch.Tensor):
            tensors[f.name] = value.detach().cpu().contiguous()
        else:
            other[f.name] = value
    tmp = path.with_suffix(".safetensors.tmp")
    save_file(
        tensors, str(tmp), metadata={"fields": json.dumps(other), "info": json.dumps(info or {})}
    )
    tmp.rename(path)


def load_ppo_batch(path: Path) -> tuple[PPOBatch, dict[str, Any]]:
    """The ``PPOBatch`` written by ``save_ppo_batch``, and its ``info``."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    return PPOBatch(**tensors, **json.loads(meta.get("fields", "{}"))), json.loads(
        meta.get("info", "{}")
    )


def read_dump(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
