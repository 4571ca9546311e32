"""The weight-sync group (``sync.transport: collective``) over gloo, its members as threads of
one process: a learner's buckets reach rollout workers exactly, in place, versioned, whether a
worker reads rank 0's shared slot or takes the broadcast (``shared_memory=False`` stands for a
worker on another host); any bucket (not only the policy's tensors) travels as sent; a member
that does not take part becomes a named error within the timeout, never a hang."""

from __future__ import annotations

import contextlib
import os
import threading
import time

import pytest
import torch

from rlhf_ray.config.ppo import load_config
from rlhf_ray.workers import collective
from rlhf_ray.workers.collective import (
    BucketSender,
    SyncGroup,
    WeightSyncError,
    host_store,
    receive_bucket,
)
from rlhf_ray.workers.learners import PolicyLearner
from rlhf_ray.workers.rollout import RolloutGenerator
from rlhf_ray.workers.shared_slot import SharedSlot, is_local, layout


def _together(*jobs) -> list:
    """Run each job in its own thread; their results (an exception is returned, not raised)."""
    out: list = [None] * len(jobs)

    def run(i, job):
        try:
            out[i] = job()
        except Exception as exc:  # noqa: BLE001 - handed back to the test
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i, j)) for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return out


def _open_slots() -> int:
    """The shared slots this process holds open (memfds; a mapping needs no fd)."""
    links = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the fd of the listing itself, closed by now
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
    return sum("memfd:rlhf_ray-sync" in link for link in links)


@pytest.mark.parametrize(
    "shared", [(True, True), (True, False), (False, False)], ids=["slot", "mixed", "broadcast"]
)
def test_workers_receive_the_learners_exact_weights_in_place_and_versioned(shared):
    """``shared``: whether each worker reads rank 0's slot (it is on rank 0's host)."""
    cfg = load_config(None, ["policy.engine=torch", "policy.num_ranks=1", "sync.bucket_mb=0.05"])
    mb = cfg.sync.bucket_mb
    learner = PolicyLearner(cfg.policy, cfg.ppo, cfg.tokenizer, 1.0)
    learner.setup()
    with torch.no_grad():  # weights a fresh worker does not have
        for p in learner.module.parameters():
            p.add_(torch.randn_like(p))
    workers = [RolloutGenerator(cfg.policy.model, cfg.tokenizer, cfg.rollout, i) for i in (0, 1)]
    storage = {n: p.data_ptr() for n, p in workers[0].model.named_parameters()}
    count = learner.num_weight_buckets(mb)
    assert count > 2
    port = learner.sync_store(30)
    versions: list[list[int]] = [[], []]

    def sender():
        learner.join_sync_group("127.0.0.1", port, "a", 3, 30, "gloo", any(shared))
        for k in range(count):
            learner.send_bucket(k, mb)
        return learner.finish_send()

    def receiver(i):
        def job():
            args = ("127.0.0.1", port, "a", i + 1, 3, 30, "gloo")
            workers[i].join_sync_group(*args, shared_memory=shared[i])
            for k in range(count):
                versions[i].append(workers[i].receive_bucket(4, k, count))

        return job

    sent, *_ = _together(sender, receiver(0), receiver(1))
    assert sent == learner.sync_nbytes()[0]  # every byte once, as sync/bytes says
    group = learner._sender.group
    assert group.locals == sum(shared)
    assert [w.sync_group.reader is not None for w in workers] == list(shared)
    # the data group: rank 0 and the workers that take the broadcast (none: no group)
    assert (group.data is None) == all(shared)
    assert [w.sync_group.data is None for w in workers] == list(shared)
    assert _open_slots() == 0  # rank 0 closed each slot's fd once the workers mapped it
    assert versions == [[-1] * (count - 1) + [4]] * 2  # no mix of versions is ever usable
    mine = learner.module.state_dict()
    for worker in workers:
        theirs = worker.model.state_dict()
        assert all(torch.equal(mine[n], theirs[n]) for n in mine)
    # in place: the worker's parameters kept their storage (no new model, no second copy)
    assert {n: p.data_ptr() for n, p in workers[0].model.named_parameters()} == storage
    assert torch.equal(workers[1].probe_logprobs(), learner.probe_logprobs())


def test_any_bucket_travels_as_sent_whatever_its_names_and_dtypes():
    """The transport does not know what it moves: e.g. adapter tensors only, in bf16."""
    store, port = host_store(30)
    bucket = {
        "layer.lora_A": torch.randn(4, 2).to(torch.bfloat16),
        "layer.lora_B": torch.randn(2, 4).to(torch.bfloat16),
        "steps": torch.tensor([3, 1, 2]),
    }

    def sender():
        out = BucketSender(SyncGroup("127.0.0.1", port, "b", 0, 2, 30, store=store))
        out.send(bucket)
        return out.finish()

    def receiver():
        return receive_bucket(SyncGroup("127.0.0.1", port, "b", 1, 2, 30))

    sent, got = _together(sender, receiver)
    assert sent == 8 * 2 + 8 * 2 + 3 * 8
    assert list(got) == list(bucket)
    assert all(got[n].dtype == bucket[n].dtype and torch.equal(got[n], bucket[n]) for n in bucket)


def test_a_bucket_larger_than_the_slot_grows_it_and_the_readers_follow():
    store, port = host_store(30)
    small = {"a": torch.arange(10, dtype=torch.float32)}
    large = {"b": torch.randn(300, 70), "c": torch.arange(7, dtype=torch.int16)}
    serials: list[int] = []

    def sender():
        out = BucketSender(SyncGroup("127.0.0.1", port, "g", 0, 2, 30, store=store))
        for bucket in (small, large, small):
            out.send(bucket, reserve=1024)  # smaller than ``large``: the slot grows once
            serials.append(out.group.slot.info[2])
        return out.finish()

    def receiver():
        group = SyncGroup("127.0.0.1", port, "g", 1, 2, 30)
        return [receive_bucket(group) for _ in range(3)]

    sent, got = _together(sender, receiver)
    assert serials == [2, 3, 3]  # the probe's slot, then one for ``large``, kept for ``small``
    for bucket, received in zip((small, large, small), got, strict=True):
        assert list(received) == list(bucket)
        assert all(torch.equal(received[n], bucket[n]) for n in bucket)
    assert got[0]["a"].data_ptr() != got[2]["a"].data_ptr()  # copies, not views of the slot
    assert _open_slots() == 0


def test_without_a_memfd_every_member_takes_the_broadcast(monkeypatch):
    def no_memfd():
        raise OSError(38, "Function not implemented")  # an old kernel, a strict sandbox

    monkeypatch.setattr(collective, "SharedSlot", no_memfd)
    store, port = host_store(30)
    bucket = {"w": torch.randn(64, 8)}

    def sender():
        out = BucketSender(SyncGroup("127.0.0.1", port, "m", 0, 2, 30, store=store))
        out.send(bucket)
        return out.finish(), out.group

    def receiver():
        group = SyncGroup("127.0.0.1", port, "m", 1, 2, 30)
        return receive_bucket(group), group

    (sent, group0), (got, group1) = _together(sender, receiver)
    assert sent == 64 * 8 * 4 and torch.equal(got["w"], bucket["w"])
    assert group0.slot is None and group1.reader is None and group0.locals == 0


def test_a_slot_is_read_only_where_its_token_is():
    slot = SharedSlot()
    pid, fd = slot.info[:2]
    assert is_local(pid, fd, slot.token)
    assert not is_local(pid, fd, "another rank 0's token")  # the same pid and fd elsewhere
    slot.mapped()
    assert not is_local(pid, fd, slot.token)  # closed: nobody new can open it
    read, write = os.pipe()  # what that fd may be on another host: no hang, no match
    try:
        assert not is_local(pid, read, slot.token)
    finally:
        os.close(read)
        os.close(write)
    assert layout([1, 64, 65, 0, 3]) == ([0, 64, 128, 256, 256], 320)


def test_a_member_that_does_not_take_part_is_a_named_error_within_the_timeout():
    store, port = host_store(30)
    groups: dict[int, SyncGroup] = {}

    def join(rank):
        def job():
            own = store if rank == 0 else None  # the others connect to rank 0's store
            groups[rank] = SyncGroup("127.0.0.1", port, "c", rank, 3, 30, store=own)
            groups[rank].timeout_s = 2  # what each broadcast waits (joining a busy machine: 30)

        return job

    _together(join(0), join(1), join(2))
    start = time.monotonic()
    sender = BucketSender(groups[0])

    def send():
        sender.send({"w": torch.ones(1000)})
        return sender.finish()

    # rank 2 is alive but never receives (a hung worker)
    sent, got = _together(send, lambda: receive_bucket(groups[1]))
    assert time.monotonic() - start < 60  # bounded by the 2 s timeout, not a hang
    for error in (sent, got):
        assert isinstance(error, WeightSyncError), error
    assert "train.phase_timeout_s=2s" in str(sent)
    with pytest.raises(WeightSyncError, match="broken earlier"):  # no more buckets on it
        receive_bucket(groups[1])
