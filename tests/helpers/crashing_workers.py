"""In-process workers that crash on purpose, for the resume tests."""

from __future__ import annotations

from rlhf_ray.workers.inprocess import InProcessWorkers


class CrashAt(InProcessWorkers):
    """In-process workers whose update raises in round ``crash_round`` (a killed driver)."""

    def __init__(self, cfg, crash_round: int):
        super().__init__(cfg)
        self.crash_round = crash_round

    def update(self, batch, round_index):
        if round_index == self.crash_round:
            raise RuntimeError("simulated crash")
        return super().update(batch, round_index)
