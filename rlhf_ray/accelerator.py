"""Which accelerator each actor runs on, made explicit (no library guesses it).

The Ray runtime (``rlhf_ray.distributed.runtime``) gives every actor the environment of
``actor_env(gpus)``, from the GPUs it asked Ray for:

- an actor with GPUs gets ``DS_ACCELERATOR=cuda``. Ray sets its ``CUDA_VISIBLE_DEVICES`` to the
  GPUs it assigned (``ray.get_gpu_ids()``), so ``cuda:0`` is the first of them and
  ``LOCAL_RANK=0`` is right for every learner rank (one GPU per rank, see ``config.py``);
- an actor without GPUs gets ``DS_ACCELERATOR=cpu`` and ``CUDA_VISIBLE_DEVICES=""``. Ray leaves
  the variable alone for an actor with no GPUs (``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO`` is off
  by default), so on a GPU node it would otherwise see every GPU of the node, and
  ``torch.cuda.is_available()`` would put its model on a GPU another actor was given.

The environment of the process that started the run (a test suite's ``DS_ACCELERATOR=cpu``, a
user's shell) never reaches an actor: ``runtime_env`` variables replace inherited ones.
``default_device`` reads the assignment back and refuses one the process cannot honour;
``check_deepspeed_accelerator`` checks DeepSpeed agrees before a learner builds its engine.
"""

from __future__ import annotations

import os

import torch

from rlhf_ray.errors import UserError

ACCELERATOR_VAR = "DS_ACCELERATOR"  # DeepSpeed's own variable: one name for both


class AcceleratorError(UserError):
    """An actor's device, DeepSpeed's accelerator and the GPUs it can see disagree."""


def actor_env(gpus: float) -> dict[str, str]:
    """The accelerator variables of an actor that asked Ray for ``gpus`` GPUs."""
    if gpus > 0:
        return {ACCELERATOR_VAR: "cuda"}
    return {ACCELERATOR_VAR: "cpu", "CUDA_VISIBLE_DEVICES": ""}


def default_device() -> torch.device:
    """The device the runtime assigned to this process (``actor_env``); outside an actor of the
    runtime (no ``DS_ACCELERATOR``), this process's first GPU if it sees one, else the CPU."""
    name = os.environ.get(ACCELERATOR_VAR)
    if name is None:
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name != "cuda":
        raise AcceleratorError(f"{ACCELERATOR_VAR}={name!r}: rlhf_ray runs on 'cuda' or 'cpu'")
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise AcceleratorError(
            f"this actor was assigned a GPU ({ACCELERATOR_VAR}=cuda, CUDA_VISIBLE_DEVICES="
            f"{visible!r}) but torch sees none (torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda}): install a CUDA build of torch on the GPU nodes, or give "
            "the role num_gpus 0"
        )
    return torch.device("cuda", 0)  # the first GPU Ray assigned (CUDA_VISIBLE_DEVICES)


def check_deepspeed_accelerator(device: torch.device) -> None:
    """Refuse to build a DeepSpeed engine whose accelerator is not this rank's device (a CPU
    accelerator with the model on CUDA, or the reverse, fails later and far less clearly)."""
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    if name != device.type:
        raise AcceleratorError(
            f"DeepSpeed's accelerator is {name!r} but this rank's device is {device} "
            f"({ACCELERATOR_VAR}={os.environ.get(ACCELERATOR_VAR)!r}): DeepSpeed chose its "
            "accelerator before the runtime's assignment took effect; start the rank with "
            f"{ACCELERATOR_VAR}={device.type}"
        )
