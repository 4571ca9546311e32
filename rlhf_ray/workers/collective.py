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

Over gloo, members on rank 0's host (``sync.shared_memory``) do not take the broadcast: rank 0
writes the bucket once into shared memory (``workers/shared_slot.py``) before its header goes
out, they copy it from there, and every member then joins one small all-reduce ("done") after
which rank 0 may overwrite the slot. The broadcast of the tensors runs in a second group of rank
0 and the members on other hosts only. The header, the done and the failures stay in the group
of all members, so a member lost on either path breaks the whole formation, as before.
"""

from __future__ import annotations

import datetime
import json
import logging
from typing import Any

import torch
import torch.distributed as dist

from rlhf_ray.workers.shared_slot import SharedSlot, SlotReader, is_local, view

log = logging.getLogger(__name__)


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


def _offer_slot() -> SharedSlot | None:
    """Rank 0's shared slot, or None where this kernel or sandbox has no memfd to give (then
    every member takes the broadcast)."""
    try:
        return SharedSlot()
    except (OSError, RuntimeError, AttributeError) as exc:  # AttributeError: no os.memfd_create
        log.warning("weight sync: no shared slot (%s); every worker takes the broadcast", exc)
        return None


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
        shared_memory: bool = True,
    ):
        """Join formation ``tag`` of the group whose rendezvous ``store`` rank 0 hosts at
        ``address:port`` (rank 0 passes its own store). Blocks until every member joined or
        ``timeout_s`` passed (then ``WeightSyncError``). ``shared_memory`` (gloo only): take
        buckets from rank 0's shared memory when on its host (on rank 0: offer it)."""
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.broken: str | None = None
        self.slot: SharedSlot | None = None  # rank 0, when members share its host
        self.reader: SlotReader | None = None  # a member on rank 0's host
        self.locals = 0  # how many members read the slot
        shared_memory = shared_memory and backend == "gloo"
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
                if rank == 0:
                    self.slot = _offer_slot() if shared_memory else None
                    offer = [self.slot.info, self.slot.token] if self.slot else None
                    prefixed.set("shm", json.dumps(offer))
                self.pg = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
                self.device = torch.device("cpu")
            self.data = self.pg  # the group the tensors are broadcast in
            if backend != "nccl":
                self._split(prefixed, shared_memory, timeout)
        except (RuntimeError, dist.DistError, OSError) as exc:
            self.close()
            raise self._error(f"could not form the group ({exc})") from None

    def _split(self, prefixed: Any, shared_memory: bool, timeout: datetime.timedelta) -> None:
        """Which members share rank 0's host; the others (and rank 0) get the data group."""
        if self.rank > 0:
            offer = json.loads(prefixed.get("shm"))
            local = shared_memory and offer is not None and is_local(*offer[0][:2], offer[1])
            prefixed.set(f"local/{self.rank}", "1" if local else "0")
            self.reader = SlotReader() if local else None
        flags = [prefixed.get(f"local/{r}") == b"1" for r in range(1, self.world_size)]
        self.locals = sum(flags)
        if self.slot is not None:
            self.slot.close()  # every member has read the probe; buckets get a slot of their own
            if not self.locals:
                self.slot = None
        if not self.locals:
            return  # everyone takes the broadcast: the data group is the group
        remote = [0] + [r for r, local in enumerate(flags, start=1) if not local]
        self.data = None  # a member that reads the slot, or rank 0 with no one to broadcast to
        if len(remote) > 1 and self.rank in remote:
            data_store = dist.PrefixStore("data", prefixed)
            self.data = dist.ProcessGroupGloo(
                data_store, remote.index(self.rank), len(remote), timeout
            )

    @property
    def needs_host_tensors(self) -> bool:
        """Whether rank 0 must hand over host tensors: a gloo broadcast takes nothing else;
        the shared slot alone copies them from any device."""
        return self.device.type == "cpu" and self.data is not None

    def close(self) -> None:
        """Release the shared slot (rank 0) or its mapping (a local member)."""
        if self.slot is not None:
            self.slot.close()
        self.slot = self.reader = None

    def _error(self, what: str) -> WeightSyncError:
        return WeightSyncError(
            f"weight sync group, rank {self.rank} of {self.world_size}: {what}. A member died "
            f"or did not answer within train.phase_timeout_s={self.timeout_s:g}s"
        )

    def broadcast(self, tensor: torch.Tensor) -> Any:
        """Start broadcasting ``tensor`` from rank 0 to every member (in place on the others)."""
        return self.pg.broadcast(tensor, 0)

    def broadcast_data(self, tensor: torch.Tensor) -> Any:
        """Start broadcasting ``tensor`` to the members that do not read rank 0's slot."""
        return self.data.broadcast(tensor, 0)

    def done(self) -> Any:
        """Start the all-reduce every member joins once the slot's bucket is no longer read."""
        return self.pg.allreduce([torch.zeros(1, device=self.device)])

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


class SyncMember:
    """A rollout worker's place in the weight-sync group (mixed into both backends)."""

    sync_group: SyncGroup | None = None

    def join_sync_group(self, *args: Any, **kwargs: Any) -> None:
        """Join a formation of the group (``SyncGroup``'s arguments), leaving the last one's
        mapping of rank 0's slot."""
        if self.sync_group is not None:
            self.sync_group.close()
        self.sync_group = SyncGroup(*args, **kwargs)

    def _sync_group(self) -> SyncGroup:
        assert self.sync_group is not None, "join the weight-sync group first"
        return self.sync_group


def encode_header(
    bucket: dict[str, torch.Tensor], slot: list[int] | None = None, offsets: list[int] | None = None
) -> torch.Tensor:
    """A bucket's names, shapes and dtypes, and where it lies in rank 0's shared slot (if it
    does), as UTF-8 JSON bytes (uint8)."""
    meta = [
        [name, list(t.shape), str(t.dtype).removeprefix("torch.")] for name, t in bucket.items()
    ]
    text = json.dumps({"tensors": meta, "slot": slot, "offsets": offsets})
    return torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8)


def decode_header(data: torch.Tensor) -> tuple[list[tuple[str, list[int], torch.dtype]], Any]:
    """``encode_header``'s tensors, and (slot, offsets) or None."""
    header = json.loads(bytes(data.tolist()).decode())
    tensors = [(n, s, getattr(torch, d)) for n, s, d in header["tensors"]]
    return tensors, (header["slot"], header["offsets"]) if header["slot"] else None


class BucketSender:
    """Rank 0's side: broadcasts one bucket while the next is gathered. The broadcast of bucket
    k is waited for only when bucket k+1 is handed over (so the gather of k+1 overlaps it);
    rank 0 holds at most two buckets beyond its model (and the shared slot: one bucket)."""

    def __init__(self, group: SyncGroup):
        self.group = group
        self._pending: tuple[list[Any], dict[str, torch.Tensor]] | None = None
        self.sent_bytes = 0

    def send(self, bucket: dict[str, torch.Tensor], reserve: int = 0) -> None:
        """Start broadcasting ``bucket`` (tensors on the group's device). ``reserve``: bytes
        the shared slot should hold at least when it grows (the bucket size). After a failure
        it sends nothing; ``finish`` raises it."""
        try:
            self._wait_pending()
        except WeightSyncError:
            return
        group = self.group
        if group.broken:
            return
        tensors = [t.detach() for t in bucket.values()]
        slot = offsets = None
        if group.slot is not None:  # the local members read it before the header arrives
            try:
                offsets = group.slot.write(tensors, reserve)
            except (OSError, RuntimeError) as exc:
                group.broken = f"could not fill the shared-memory slot ({exc})"
                return
            slot = group.slot.info
        header = encode_header(bucket, slot, offsets).to(group.device)
        length = torch.tensor([header.numel()], dtype=torch.int64, device=group.device)
        works = [group.broadcast(length), group.broadcast(header)]
        if group.data is not None:
            works += [group.broadcast_data(t.contiguous()) for t in tensors]
        if group.locals:
            works.append(group.done())
        self.sent_bytes += sum(t.nbytes for t in tensors)
        self._pending = (works, bucket)  # the tensors stay alive until their broadcast ends

    def _wait_pending(self) -> None:
        if self._pending is not None:
            works, self._pending = self._pending[0], None
            self.group.wait(works)
            if self.group.slot is not None:
                self.group.slot.mapped()  # every local member has mapped the slot by now

    def finish(self) -> int:
        """Wait for the last bucket; the bytes sent since the last ``finish``, or the
        ``WeightSyncError`` of any broadcast since."""
        self._wait_pending()
        if self.group.broken:
            raise self.group._error(f"broken ({self.group.broken})")
        sent, self.sent_bytes = self.sent_bytes, 0
        return sent


def _fits(target: torch.Tensor | None, shape: list[int], dtype: torch.dtype, device) -> bool:
    return (
        target is not None
        and target.is_contiguous()
        and target.device == device
        and list(target.shape) == shape
        and target.dtype == dtype
    )


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
    meta, shared = decode_header(header.cpu())
    targets = targets or {}
    if group.reader is not None and shared is not None:
        return _copy_from_slot(group, meta, shared, targets)
    out: dict[str, torch.Tensor] = {}
    for name, shape, dtype in meta:
        target = targets.get(name)
        if target is not None and _fits(target, shape, dtype, group.device):
            out[name] = target.data
        else:
            out[name] = torch.empty(shape, dtype=dtype, device=group.device)
    works = [group.broadcast_data(t) for t in out.values()]
    group.wait(works + ([group.done()] if group.locals else []))
    return out


def _copy_from_slot(group: SyncGroup, meta: list, shared: Any, targets: dict) -> dict:
    """A local member's bucket: copied out of rank 0's slot, then the done that frees it."""
    info, offsets = shared
    assert group.reader is not None
    try:
        slot = group.reader.slot(info)
    except (OSError, RuntimeError) as exc:
        group.broken = f"could not map rank 0's shared-memory slot ({exc})"
        raise group._error(group.broken) from None
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for (name, shape, dtype), offset in zip(meta, offsets, strict=True):
            source, target = view(slot, offset, shape, dtype), targets.get(name)
            if target is not None and list(target.shape) == shape and target.dtype == dtype:
                out[name] = target.data.copy_(source)  # on any device: one host-to-device copy
            else:
                out[name] = source.clone()
    group.wait([group.done()])
    return out
