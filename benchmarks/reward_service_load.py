"""Load on a 2-replica ``serve-reward`` service over loopback: 8 concurrent clients x 50
requests x 64 responses, through the real client (``RemoteReward``: 503/Retry-After, retries).

Prints p50/p99 request latency, throughput (responses/s), the client retries, and the proof that
no request was lost or scored twice: every response carries a unique id, the served function
scores it as that id (so an answer mixed up between batched requests shows) and logs every id it
scored to a file per replica process; afterwards each sent id must appear exactly once.

    python benchmarks/reward_service_load.py [--clients 8 --requests 50 --responses 64]

Bounded: at most ``--time-limit-s`` (300) of load, then it reports what finished.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

LOG_VAR = "RR_LOAD_LOG_DIR"


def tagged_score(prompts: list[str], responses: list[str]) -> list[float]:
    """The served function: each response ``"id:<n>"`` scores ``n``; every id is logged."""
    ids = [int(r.split(":")[1]) for r in responses]
    with open(Path(os.environ[LOG_VAR]) / f"{os.getpid()}.log", "a") as f:
        f.write("".join(f"{i}\n" for i in ids))
    return [float(i) for i in ids]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client(url: str, c: int, args, latencies: list, stats: dict, deadline: float) -> None:
    from rlhf_ray.config.rewards import RemoteRewardConfig
    from rlhf_ray.rewards.remote import RemoteReward

    cfg = RemoteRewardConfig(url=url, batch_size=args.responses, max_retries=20, backoff_s=0.05)
    client = RemoteReward(cfg)
    for k in range(args.requests):
        if time.monotonic() > deadline:
            break
        ids = [(c * args.requests + k) * args.responses + j for j in range(args.responses)]
        started = time.perf_counter()
        scores, st = client.score(["p"] * len(ids), [f"id:{i}" for i in ids])
        latencies.append(time.perf_counter() - started)
        with stats["lock"]:
            stats["sent"].extend(ids)
            stats["retries"] += st.retries
            stats["mixed"] += sum(s != float(i) for s, i in zip(scores, ids, strict=True))
    client.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--responses", type=int, default=64)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--time-limit-s", type=float, default=300.0)
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from _common import banner, local_ray

    from rlhf_ray.distributed.reward_service import ServiceOptions, serve_reward

    banner("reward service under load (loopback)")
    os.environ[LOG_VAR] = tempfile.mkdtemp(prefix="rr-load-")  # inherited by the local Ray
    with local_ray(num_cpus=2):
        from ray import serve

        scorer = {
            "reward_model": None,
            "function": "reward_service_load:tagged_score",
            "search_path": [str(Path(__file__).parent)],
        }
        opts = ServiceOptions(name="load", port=_free_port(), replicas=args.replicas, num_cpus=0.5)
        url = serve_reward(scorer, opts)
        latencies: list[float] = []
        stats = {"lock": threading.Lock(), "sent": [], "retries": 0, "mixed": 0}
        deadline = time.monotonic() + args.time_limit_s
        threads = [
            threading.Thread(target=_client, args=(url, c, args, latencies, stats, deadline))
            for c in range(args.clients)
        ]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
        serve.shutdown()
    scored = Counter(
        int(line) for f in Path(os.environ[LOG_VAR]).glob("*.log") for line in f.open()
    )
    sent = stats["sent"]
    lat = sorted(latencies)
    planned = args.clients * args.requests
    print(
        f"service: {url}, {args.replicas} replicas; {args.clients} clients x {args.requests} "
        f"requests x {args.responses} responses"
    )
    print(f"requests answered: {len(lat)} of {planned} in {elapsed:.1f} s")
    print(
        f"latency per request: p50 {lat[len(lat) // 2] * 1e3:.1f} ms, "
        f"p99 {lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3:.1f} ms"
    )
    print(f"throughput: {len(lat) / elapsed:.1f} requests/s, {len(sent) / elapsed:.0f} responses/s")
    print(f"client retries (503 + Retry-After, errors): {stats['retries']}")
    lost = set(sent) - set(scored)
    twice = [i for i, n in scored.items() if n > 1]
    unknown = set(scored) - set(sent)
    print(
        f"responses sent {len(sent)}, distinct ids scored {len(scored)}; lost {len(lost)}, "
        f"scored twice {len(twice)}, scored but never answered {len(unknown)}, "
        f"answers with another request's score {stats['mixed']}"
    )


if __name__ == "__main__":
    main()
