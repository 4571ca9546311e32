"""Every tensor the DeepSpeed engine hands to torch.distributed lives on the engine's device.

On a GPU learner the process group is NCCL only, and NCCL has no backend for CPU tensors: a CPU
tensor in a collective raises in round 0 ("No backend type associated with device type cpu").
There is no GPU here, so the engine's device is set to ``meta`` (a non-CPU sentinel) and the
collectives are replaced by a recorder that notes each tensor's device, then stops the call
(a meta tensor has no value to read back).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from rlhf_ray.engines.training import DeepSpeedEngine

SENTINEL = torch.device("meta")
COLLECTIVES = (
    "all_reduce",
    "gather",
    "all_gather",
    "broadcast",
    "reduce",
    "all_gather_into_tensor",
)


class _Recorded(Exception):
    """Raised by the recorder once the collective's tensors are noted."""


@pytest.fixture
def recorded(monkeypatch) -> list[torch.device]:
    devices: list[torch.device] = []

    def record(name: str):
        def collective(tensor, *args, **kwargs):
            devices.append(tensor.device)
            for t in kwargs.get("gather_list") or []:
                devices.append(t.device)
            raise _Recorded(name)

        return collective

    for name in COLLECTIVES:
        monkeypatch.setattr(dist, name, record(name))
    return devices


def _engine(rank: int, zero_stage: int = 3) -> DeepSpeedEngine:
    """An engine as ``DeepSpeedEngine.__init__`` leaves it, without DeepSpeed behind it."""
    engine = object.__new__(DeepSpeedEngine)
    engine.rank, engine.world_size, engine.zero_stage = rank, 2, zero_stage
    engine.device = SENTINEL
    return engine


def _zero3_param() -> torch.nn.Parameter:
    """What ZeRO-3 leaves of a (4, 3) parameter on one of 2 ranks: an empty tensor with its
    partition (here offloaded to the CPU) and its whole shape."""
    param = torch.nn.Parameter(torch.empty(0))
    zero3 = vars(param)
    zero3.update(ds_tensor=torch.zeros(6), ds_numel=12, ds_shape=torch.Size([4, 3]))
    return param


def test_all_reduce_sum_reduces_on_the_engine_device(recorded):
    with pytest.raises(_Recorded, match="all_reduce"):
        _engine(rank=0).all_reduce_sum(1.0)
    assert recorded == [SENTINEL]


@pytest.mark.parametrize("rank", [0, 1])
def test_zero3_partitions_are_gathered_on_the_engine_device(recorded, rank):
    with pytest.raises(_Recorded, match="gather"):
        _engine(rank).whole_on_rank0({"w": _zero3_param()})
    assert recorded and all(d == SENTINEL for d in recorded), recorded
