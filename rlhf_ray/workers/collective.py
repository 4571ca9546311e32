"""The weight-sync group of ``sync.transport: collective``: policy rank 0 (rank 0 here) and the
rollout workers (ranks 1..N) in a torch.distributed group of their own.

The group is not the learners' default group: rank 0 hosts a ``TCPStore`` for it, and each
formation builds a ``ProcessGroupGloo`` (CPU tensors) or ``ProcessGroupNCCL`` (every member on
a GPU) directly on a ``PrefixStore`` of that store, tagged by the formation. Nothing is
registered with ``torch.distributed``'s world, so ``init_process_group`` of the learners is not
touched, and a worker process needs no default group at all.

A bucket is whatever the sender hands over: an ordered ``{name: tensor}`` (full weights, or
only adapters). It travels self-described: its length and a JSON header (names, shapes, dtypes)
first, then one broadcast per tensor from rank 0's memory (its live parameters, or a ZeRO-3
gather's output), received in place where the receiver has a matching tensor. Every operation
has the group's timeout (``train.phase_timeout_s``); a failure or a timeout is a
``WeightSyncError``, and the group refuses further buckets until it is formed again.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

import torch
import torch.distributed as dist


class WeightSyncError(RuntimeError):
    """A weight broadcast failed: a member died, or did not answer within the timeout."""


def _timedelta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def host_store(timeout_s: float) -> tuple[Any, int]:
    """The rendezvous store of rank 0, on a port free now: (store, port)."""
    store = dist.TCPStore(
        "0.0.0.0", 0, is_master=True, wait_for_workers=False, timeout=_timedelta(timeout_s)
    )
    return store, store.port


class SyncGroup:
    """This process's member of one formation of the weight-sync group."""

    def __init__(
        self,
        address: str,
        port: int,
        tag: str,
        rank: int,
        world_size: int,
        timeout_s: float,
        backend: str = "gloo",
        store: Any = None,
    ):
        """Join formation ``tag`` of the group whose rendezvous ``store`` rank 0 hosts at
        ``address:port`` (rank 0 passes its own store). Blocks until every member joined or
        ``timeout_s`` passed (then ``WeightSyncError``)."""
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.broken: str | None = None
        timeout = _timedelta(timeout_s)
        try:
            if store is None:
                store = dist.TCPStore(address, port, is_master=False, timeout=timeout)
            prefixed = dist.PrefixStore(f"rlhf_ray-sync/{tag}", store)
            if backend == "nccl":
                options = dist.ProcessGroupNCCL.Options()
                options._timeout = timeout
                self.pg: Any = dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
                self.device = torch.device("cuda", torch.cuda.current_device())
            else:
                self.pg = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
                self.device = torch.device("cpu")
        except (RuntimeError, dist.DistError) as exc:
            raise self._error(f"could not form the group ({exc})") from None

    def _error(self, what: str) -> WeightSyncError:
        return WeightSyncError(
            f"weight sync group, rank {self.rank} of {self.world_size}: {what}. A member died "
            f"or did not answer within train.phase_timeout_s={self.timeout_s:g}s"
        )

    def broadcast(self, tensor: torch.Tensor) -> Any:
        """Start broadcasting ``tensor`` from rank 0 (in place on the others)."""
        return self.pg.broadcast(tensor, 0)

    def wait(self, works: list[Any]) -> None:
        """Wait for ``works``; the first failure breaks the group (``WeightSyncError``)."""
        if self.broken:
            raise self._error(f"broken earlier ({self.broken})")
        try:
            for work in works:
                work.wait(_timedelta(self.timeout_s))
        except (RuntimeError, dist.DistError) as exc:
            self.broken = str(exc).splitlines()[0][:300]
            raise self._error(self.broken) from None


def encode_header(bucket: dict[str, torch.Tensor]) -> torch.Tensor:
    """A bucket's names, shapes and dtypes as UTF-8 JSON bytes (uint8)."""
    meta = [
        [name, list(t.shape), str(t.dtype).removeprefix("torch.")] for name, t in bucket.items()
    ]
    return torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)


def decode_header(data: torch.Tensor) -> list[tuple[str, list[int], torch.dtype]]:
    return [(n, s, getattr(torch, d)) for n, s, d in json.loads(bytes(data.tolist()).decode())]


class BucketSender:
    """Rank 0's side: broadcasts one bucket while the next is gathered. The broadcast of bucket
    k is waited for only when bucket k+1 is handed over (so the gather of k+1 overlaps it);
    rank 0 holds at most two buckets beyond its model."""

    def __init__(self, group: SyncGroup):
        self.group = group
        self._pending: tuple[list[Any], dict[str, torch.Tensor]] | None = None
        self.sent_bytes = 0

    def send(self, bucket: dict[str, torch.Tensor]) -> None:
        """Start broadcasting ``bucket`` (tensors on the group's device). After a failure it
        sends nothing; ``finish`` raises it."""
        try:
            self._wait_pending()
        except WeightSyncError:
            return
        if self.group.broken:
            return
        header = encode_header(bucket).to(self.group.device)
        length = torch.tensor([header.numel()], dtype=torch.int64, device=self.group.device)
        works = [self.group.broadcast(length), self.group.broadcast(header)]
        works += [self.group.broadcast(t.detach().contiguous()) for t in bucket.values()]
        self.sent_bytes += sum(t.numel() * t.element_size() for t in bucket.values())
        self._pending = (works, bucket)  # the tensors stay alive until their broadcast ends

    def _wait_pending(self) -> None:
        if self._pending is not None:
            works, self._pending = self._pending[0], None
            self.group.wait(works)

    def finish(self) -> int:
        """Wait for the last bucket; the bytes sent since the last ``finish``, or the
        ``WeightSyncError`` of any broadcast since."""
        self._wait_pending()
        if self.group.broken:
            raise self.group._error(f"broken ({self.group.broken})")
        sent, self.sent_bytes = self.sent_bytes, 0
        return sent


def receive_bucket(
    group: SyncGroup, targets: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Receive one bucket from rank 0: ``{name: tensor}`` in the sender's order. A tensor of
    ``targets`` with the same shape, dtype and device (contiguous) receives its bytes in place
    and is returned as such; the others arrive in new tensors on the group's device."""
    group.wait([])  # a broken group posts nothing more
    length = torch.zeros(1, dtype=torch.int64, device=group.device)
    group.wait([group.broadcast(length)])
    header = torch.empty(int(length.item()), dtype=torch.uint8, device=group.device)
    group.wait([group.broadcast(header)])
    out: dict[str, torch.Tensor] = {}
    for name, shape, dtype in decode_header(header.cpu()):
        target = (targets or {}).get(name)
        fits = target is not None and target.is_contiguous() and target.device == group.device
        if fits and target is not None and list(target.shape) == shape and target.dtype == dtype:
            out[name] = target.data
        else:
            out[name] = torch.empty(shape, dtype=dtype, device=group.device)
    group.wait([group.broadcast(t) for t in out.values()])
    return out
