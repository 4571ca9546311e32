"""Torch's CPU threads in a worker process, which the driver resizes between phases
(``distributed/threads.py``).

``torch.set_num_threads`` is bound here, at import, before any vLLM engine starts: vLLM's CPU
worker replaces it process-wide with a no-op, because it pins its threads to cores. This
project's in-process engines do not pin (``VLLM_CPU_OMP_THREADS_BIND=nobind``,
``engines/vllm_engine.py``), so resizing the pool stays safe there."""

from __future__ import annotations

import torch

_set_num_threads = torch.set_num_threads


def set_threads(num_threads: int | None) -> None:
    """Run torch's CPU kernels on ``num_threads`` threads (None or 0: leave them)."""
    if num_threads:
        _set_num_threads(num_threads)


class PhaseThreads:
    """Mixed into every worker class that runs as an actor of a PPO run: the driver gives it
    its threads for the phase about to run."""

    def set_threads(self, num_threads: int) -> None:
        set_threads(num_threads)

    def num_threads(self) -> int:
        return torch.get_num_threads()
