"""One bucket in shared memory, for the weight-sync group's members on rank 0's host.

Over gloo, a broadcast sends every receiver its own copy through loopback TCP, so on one host
its time grows with the receivers (README, "Memory and scale"). Instead rank 0 writes each bucket
once into a ``memfd`` (anonymous shared memory: no file name to leak, no ``/dev/shm`` size
limit, freed with its last mapping) and the members on its host map that file through
``/proc/<rank 0's pid>/fd/<fd>`` and copy the bucket straight into their tensors. A member on
another host cannot open that path, or opens a different file there: the random token in the
formation's probe tells them apart (``is_local``), so such a member gets the broadcast.

Rank 0 closes each fd once every local member has mapped its file (``SharedSlot.mapped``): the
memory lives as long as a mapping does, and nothing outlives the processes.
"""

from __future__ import annotations

import math
import os
import secrets
import stat

import torch

ALIGN = 64  # every tensor starts on a 64-byte boundary of the slot (any dtype views it)
PROBE_BYTES = 64


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def layout(sizes: list[int]) -> tuple[list[int], int]:
    """Offsets of tensors of ``sizes`` bytes in a slot, and the bytes they take."""
    offsets, end = [], 0
    for size in sizes:
        offsets.append(end)
        end += _aligned(size)
    return offsets, end


def _map(path: str, nbytes: int) -> torch.Tensor:
    return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)


def view(slot: torch.Tensor, offset: int, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """The tensor of ``shape`` and ``dtype`` at ``offset`` of ``slot`` (no copy)."""
    size = math.prod(shape) * dtype.itemsize
    return slot[offset : offset + size].view(dtype).view(shape)


class SharedSlot:
    """Rank 0's side: a memfd of at least the largest bucket, rewritten for every bucket.

    ``info`` is what a header carries for the local members to find it: (pid, fd, serial,
    bytes); the serial changes whenever the slot is replaced by a larger one."""

    def __init__(self) -> None:
        self.token = secrets.token_hex(16)
        self._fd: int | None = None
        self._serial = 0
        self.tensor = torch.empty(0, dtype=torch.uint8)
        self._create(PROBE_BYTES)
        self.tensor[:32].copy_(torch.frombuffer(bytearray(self.token.encode()), dtype=torch.uint8))

    @property
    def info(self) -> list[int]:
        return [
            os.getpid(),
            -1 if self._fd is None else self._fd,
            self._serial,
            self.tensor.numel(),
        ]

    def _create(self, nbytes: int) -> None:
        fd = os.memfd_create("rlhf_ray-sync", os.MFD_CLOEXEC)
        try:
            os.posix_fallocate(fd, 0, nbytes)  # ENOSPC here, not SIGBUS at the first write
            tensor = _map(f"/proc/self/fd/{fd}", nbytes)
        except (OSError, RuntimeError):
            os.close(fd)
            raise
        self.mapped()
        self._fd, self.tensor = fd, tensor
        self._serial += 1

    def mapped(self) -> None:
        """Every local member has mapped the current file: its fd is no longer needed."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def write(self, tensors: list[torch.Tensor], reserve: int) -> list[int]:
        """Copy ``tensors`` into the slot (grown to at least ``reserve`` bytes first if they do
        not fit); their offsets."""
        offsets, end = layout([t.nbytes for t in tensors])
        if end > self.tensor.numel():
            self._create(max(end, _aligned(reserve)))
        for t, offset in zip(tensors, offsets, strict=True):
            view(self.tensor, offset, list(t.shape), t.dtype).copy_(t)
        return offsets

    def close(self) -> None:
        self.mapped()
        self.tensor = torch.empty(0, dtype=torch.uint8)


def is_local(pid: int, fd: int, token: str) -> bool:
    """Whether rank 0's probe (``SharedSlot.info`` at formation, and its token) is readable
    from here: the same host, the same process namespace, and leave to open it."""
    try:  # non-blocking: on another host that fd may be a pipe or a device
        handle = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        return stat.S_ISREG(os.fstat(handle).st_mode) and os.read(handle, 32) == token.encode()
    except OSError:
        return False
    finally:
        os.close(handle)


class SlotReader:
    """A local member's mapping of rank 0's current slot (mapped again when it changes)."""

    def __init__(self) -> None:
        self._serial: tuple[int, int] | None = None
        self.tensor = torch.empty(0, dtype=torch.uint8)

    def slot(self, info: list[int]) -> torch.Tensor:
        pid, fd, serial, nbytes = info
        if self._serial != (pid, serial):
            path = f"/proc/{pid}/fd/{fd}"
            if os.stat(path).st_size < nbytes:  # never let a mapping grow someone's file
                raise OSError(f"{path} is smaller than the {nbytes} bytes announced")
            self.tensor = torch.empty(0, dtype=torch.uint8)  # the old mapping goes first
            self.tensor, self._serial = _map(path, nbytes), (pid, serial)
        return self.tensor
