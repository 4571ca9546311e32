"""The sync check: after a sync a rollout worker and the policy learner agree exactly on the probe
sequence, and a worker holding other weights stops the run with a clear error."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.config.ppo import load_config
from rlhf_ray.ppo.loop import run_ppo
from rlhf_ray.workers.inprocess import InProcessWorkers
from rlhf_ray.workers.interface import SyncCheckError, check_sync

TINY = ["policy.engine=torch", "policy.num_ranks=1", "value.engine=torch", "train.rounds=2",
        "rollout.batch_size=4", "ppo.minibatch_size=4", "ppo.epochs=1",
        "rollout.max_new_tokens=4", "logging.progress=false", "rollout.num_workers=2"]  # fmt: skip


class CorruptedOnSync(InProcessWorkers):
    """Rollout worker 1 silently holds other weights after the sync to version 1."""

    def sync(self, version: int) -> None:
        super().sync(version)
        if version == 1:
            weight = self.generators[1].model.get_input_embeddings().weight
            noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():  # (a constant shift would cancel in the layer norms)
                weight.add_(0.05 * noise)


def test_probe_agrees_after_sync_and_a_corrupted_worker_stops_the_run(tmp_path):
    cfg = load_config(None, TINY)
    workers = CorruptedOnSync(cfg)
    workers.sync(0)
    for version in (0, 1):  # the worker checked rotates with the version: both are exact
        assert check_sync(workers, cfg.sync, version) == {"sync/logprob_max_abs_diff": 0.0}
    with pytest.raises(SyncCheckError, match=r"rollout worker 1 .* sync.max_logprob_diff 0.01"):
        run_ppo(cfg, workers, tmp_path / "run")  # round 0 syncs v1 to the pool: worker 1 checked
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped before logging round 0
