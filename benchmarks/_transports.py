"""The two sync transports side by side (``benchmarks/weight_sync.py --transports``).

A ``Sender`` actor stands in for policy rank 0: it holds the policy model and, per bucket of
about ``bucket_mb`` MB, either returns it as numpy (the object store path, ``weight_bucket``)
or broadcasts it over the weight-sync group (``BucketSender``, as ``Learner.send_bucket``).
The receivers are real ``RolloutGenerator`` workers (``load_bucket`` / ``receive_bucket``). The
driver streams the buckets as ``RayWorkers.sync`` does for each transport. ``collective`` is the
default (``sync.shared_memory``: every worker here is on rank 0's host and reads its shared
slot); ``collective (broadcast)`` turns the slot off, as for workers on other hosts. With
``gpus`` each actor holds that much of a GPU and the model lives there (``benchmarks/gpu_smoke.py``):
a group of whole GPUs is NCCL (a broadcast from device memory), a group sharing one GPU is gloo
with the slot filled from rank 0's device (``config.ppo.sync_backend``). Host memory: each
process samples its own resident set (``/proc/self/statm``, every 2 ms) during the syncs; the
figure is the peak above the resident set before them (shared object-store pages a process
touches count in its resident set).
"""

from __future__ import annotations

import os
import threading
import time

import _common
import ray
import torch

from rlhf_ray.config.ppo import RolloutConfig, TokenizerConfig
from rlhf_ray.data.tokenization import build_tokenizer
from rlhf_ray.models import build_causal_lm, state_dict_to_numpy
from rlhf_ray.models.weights import full_nbytes, plan_buckets, weight_tensors
from rlhf_ray.workers.collective import BucketSender, SyncGroup, host_store
from rlhf_ray.workers.rollout import RolloutGenerator
from rlhf_ray.workers.sync import stream_buckets

PAGE = os.sysconf("SC_PAGE_SIZE")
TRANSPORTS = ("object_store", "collective (broadcast)", "collective")


class RssPeak:
    """The peak resident set above a baseline, sampled by a thread between start and stop."""

    def __init__(self):
        self._stop = threading.Event()
        self.base = self.peak = 0

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE

    def start(self) -> None:
        self.base = self.peak = self.rss()
        self._stop.clear()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.002)

    def stop(self) -> int:
        self._stop.set()
        time.sleep(0.01)
        return max(0, self.peak - self.base)


class Sender:
    """Policy rank 0's part of a sync, for either transport."""

    def __init__(self, spec, tok_cfg: TokenizerConfig, bucket_mb: float):
        torch.set_num_threads(1)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = build_causal_lm(spec, build_tokenizer(tok_cfg), device)
        tensors = weight_tensors(self.model)
        sizes = [full_nbytes(t) for t in tensors.values()]
        names = list(tensors)
        self.reserve = int(bucket_mb * 2**20)
        self.buckets = [[names[i] for i in g] for g in plan_buckets(sizes, self.reserve)]
        self.nbytes = sum(sizes)
        self.memory = RssPeak()
        self.store = self.sender = None

    def plan(self) -> tuple[int, int]:
        return len(self.buckets), self.nbytes

    def perturb(self) -> None:
        with torch.no_grad():
            next(self.model.parameters()).add_(1e-3)  # new weights every sync

    def bucket(self, k: int) -> dict[str, torch.Tensor]:
        tensors = weight_tensors(self.model)
        return {n: tensors[n].detach() for n in self.buckets[k]}

    def numpy_bucket(self, k: int):
        return state_dict_to_numpy(self.bucket(k))  # on CPU views: Ray copies them to the store

    def sync_store(self) -> int:
        self.store = host_store(120)
        return self.store[1]

    def join(self, port: int, tag: str, size: int, shared_memory: bool, backend: str) -> None:
        self.sender = BucketSender(
            SyncGroup("127.0.0.1", port, tag, 0, size, 120, backend, self.store[0], shared_memory)
        )

    def slot_mb(self) -> float:
        slot = self.sender.group.slot
        return 0.0 if slot is None else slot.tensor.numel() / 1e6

    def send(self, k: int) -> None:
        bucket = self.bucket(k)
        if self.sender.group.needs_host_tensors:
            bucket = {n: t.cpu() for n, t in bucket.items()}
        self.sender.send(bucket, self.reserve)

    def finish(self) -> int:
        return self.sender.finish()

    def mark(self) -> None:
        self.memory.start()

    def peak(self) -> int:
        return self.memory.stop()


class Worker(RolloutGenerator):
    """A rollout worker that also reports its memory peak."""

    def mark(self) -> None:
        self.memory = RssPeak()
        self.memory.start()

    def peak(self) -> int:
        return self.memory.stop()


def _object_store_sync(sender, workers, count: int, version: int) -> None:
    """``RayWorkers.sync`` with the object store: put once, every worker loads it."""

    def gather(k: int):
        ref = sender.numpy_bucket.remote(k)
        return lambda: ref

    def load(ref, k: int) -> None:
        ray.get([w.load_bucket.remote(ref, version, k, count) for w in workers])

    stream_buckets(count, gather, load)


def _collective_sync(sender, workers, count: int, version: int) -> None:
    """``CollectiveSender.send``: every call submitted at once, one wait."""
    refs = []
    for k in range(count):
        refs.append(sender.send.remote(k))
        refs += [w.receive_bucket.remote(version, k, count) for w in workers]
    refs.append(sender.finish.remote())
    ray.get(refs)


def backend_for(gpus: float) -> str:
    """NCCL for members on whole GPUs of their own, else gloo (``config.ppo.sync_backend``)."""
    return "nccl" if gpus >= 1 else "gloo"


def measure(
    spec,
    tok_cfg: TokenizerConfig,
    transport: str,
    n_workers: int,
    repeats: int,
    bucket_mb: float,
    gpus: float = 0.0,
    cpus: float | None = None,
) -> dict:
    """Median seconds per sync, GB moved, and the peak host memory of rank 0 and of a worker.
    ``gpus``: the GPU share of rank 0 and of each worker (0: all on CPUs)."""
    cpus = cpus or max(0.1, 1.9 / (n_workers + 1))
    place = {"num_cpus": cpus, "num_gpus": gpus}
    sender = ray.remote(Sender).options(**place).remote(spec, tok_cfg, bucket_mb)
    remote = ray.remote(Worker).options(**place)
    workers = [remote.remote(spec, tok_cfg, RolloutConfig(), i, 1, True) for i in range(n_workers)]
    try:
        count, nbytes = ray.get(sender.plan.remote())
        ray.get([w.ping.remote() for w in workers])
        collective = transport.startswith("collective")
        if collective:
            port = ray.get(sender.sync_store.remote())
            size, shared, backend = n_workers + 1, transport == "collective", backend_for(gpus)
            ray.get(
                [sender.join.remote(port, "bench", size, shared, backend)]
                + [
                    w.join_sync_group.remote(
                        "127.0.0.1", port, "bench", i + 1, size, 120, backend, shared_memory=shared
                    )
                    for i, w in enumerate(workers)
                ]
            )
        sync = _collective_sync if collective else _object_store_sync
        sync(sender, workers, count, 0)  # warm-up
        ray.get([sender.mark.remote()] + [w.mark.remote() for w in workers])
        seconds = []
        for version in range(1, repeats + 1):
            ray.get(sender.perturb.remote())
            start = time.perf_counter()
            sync(sender, workers, count, version)
            seconds.append(time.perf_counter() - start)
        peaks = ray.get([sender.peak.remote()] + [w.peak.remote() for w in workers])
        slot_mb = ray.get(sender.slot_mb.remote()) if collective else 0.0
        versions = ray.get([w.probe_logprobs.remote() for w in workers[:1]])
        assert versions[0].isfinite().all()
        return {
            "seconds": _common.median(seconds),
            "gb": nbytes / 1e9,
            "buckets": count,
            "rank0_mb": peaks[0] / 1e6,
            "worker_mb": max(peaks[1:]) / 1e6,
            "slot_mb": slot_mb,
        }
    finally:
        for actor in [sender, *workers]:
            ray.kill(actor)


def compare(
    spec, tok_cfg: TokenizerConfig, worker_counts: list[int], repeats: int, bucket_mb: float
) -> str:
    rows = []
    for n in worker_counts:
        for transport in TRANSPORTS:
            print(f"  {transport} x{n} ...", flush=True)
            m = measure(spec, tok_cfg, transport, n, repeats, bucket_mb)
            rows.append(
                (
                    transport,
                    n,
                    m["buckets"],
                    m["gb"] * 1e3,
                    m["seconds"],
                    m["seconds"] / m["gb"],
                    m["rank0_mb"],
                    m["worker_mb"],
                    m["slot_mb"],
                )
            )
    return _common.table(
        [
            "transport",
            "workers",
            "buckets",
            "MB",
            "s/sync",
            "s/GB",
            "rank 0 peak +MB",
            "worker peak +MB",
            "shared slot MB",
        ],
        rows,
    )
