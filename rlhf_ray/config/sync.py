"""The ``sync`` section: how the policy's weights reach the rollout workers after each update
(buckets, transport) and the check that they arrived intact."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rlhf_ray.config.sections import Section


class SyncConfig(Section):
    """How the policy's weights reach the rollout workers after each update, and the check
    that they arrived intact."""

    bucket_mb: float = Field(
        256.0,
        gt=0,
        description="Weights move in buckets of about this many MB: gathered, sent and loaded "
        "one bucket at a time (a tensor larger than a bucket travels alone).",
    )

    transport: Literal["object_store", "collective", "auto"] = Field(
        "object_store",
        description="How buckets reach the rollout workers. object_store: rank 0 puts each "
        "bucket in Ray's object store as numpy and every worker reads it (robust, host-staged). "
        "collective: policy rank 0 and the rollout workers form a torch.distributed group of "
        "their own (NCCL when both sides hold whole GPUs, else gloo) and each bucket is broadcast "
        "from rank 0's memory; the group is formed again whenever the pool changes. auto: "
        "collective when the policy ranks and the rollout workers hold whole GPUs (NCCL) or "
        "the cluster is one host (gloo with the shared slot), else object_store (see "
        "sync_transport and sync_backend).",
    )

    shared_memory: bool = Field(
        True,
        description="With transport collective over gloo (CPU): rollout workers on policy rank "
        "0's host read each bucket from one shared-memory copy that rank 0 writes, instead of "
        "each receiving its own broadcast over loopback TCP; workers on other hosts still get "
        "the broadcast. No effect on NCCL.",
    )

    max_logprob_diff: float | None = Field(
        None,
        gt=0,
        description="After each sync one rollout worker and the policy learner score a fixed "
        "probe sequence; the run stops if their log-probs differ by more than this "
        "(logged as sync/logprob_max_abs_diff). null: the default for policy.model.dtype "
        "(SYNC_TOLERANCE: float32 0.01, float16 0.05, bfloat16 0.25).",
    )

    def tolerance(self, dtype: str) -> float:
        """The probe threshold for weights of ``dtype``: ``max_logprob_diff`` if set, else
        ``SYNC_TOLERANCE[dtype]``."""
        return self.max_logprob_diff or SYNC_TOLERANCE[dtype]


# The sync check's default threshold per weight dtype. A failed sync (a missing, stale or
# mis-cast tensor) moves the probe's log-probs by O(1). float32: the worker and the learner
# agree exactly on CPU (0), 0.01 leaves room for GPU kernels. Half precision: the DeepSpeed-
# wrapped learner and a plain worker round differently (other kernels, other batch shapes); a
# bf16 logit of magnitude ~20 is only kept to ~0.08 (8 significant bits), fp16 to ~0.01.
SYNC_TOLERANCE: dict[str, float] = {"float32": 0.01, "float16": 0.05, "bfloat16": 0.25}
