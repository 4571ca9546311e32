"""``rlhf-ray serve-reward``: a reward model or function behind the remote-reward contract, as
a Ray Serve app (``--replicas`` replicas with ``--num-gpus`` each).

Routes, under the app's own prefix ``/<name>`` (``--name``, default ``reward``):

- ``POST /<name>/score`` with ``{"prompts": [str], "responses": [str], "metadata"?: [object]}``
  answers ``200 {"scores": [float]}``;
- ``GET /<name>/info`` answers what shaping the scores expect (``TextRewardScorer.shaping_info``:
  ``source``, ``normalize``, ``score_mean``, ``score_std``), which the client's
  ``reward.normalize: auto`` follows.

A wrong or missing bearer token gets 401 (compared in constant time, on SHA-256 digests: the
replicas never hold the token itself); a body over the size limit 413, checked while it is read;
a body that is not JSON 400; JSON off the contract, or a metadata object without a column the
function requires, 422; a full queue (``--max-queue`` requests waiting per replica) 503 with
``Retry-After``; a scorer that raised 500; each with ``{"error": message}``.

Requests are scored in server-side batches (``serve.batch``: up to ``BATCH_REQUESTS`` requests
per scorer call), in a thread, so the event loop keeps answering. Serve runs one HTTP proxy per
cluster: a second service shares it, so it must ask for the same host, port and certificate, or
it refuses to start (Serve would ignore its options and serve where the first one asked). Each
service is its own app: starting one never replaces another, and exiting deletes only its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from rlhf_ray.config.rewards import is_loopback
from rlhf_ray.errors import UserError
from rlhf_ray.workers.text_reward import TextRewardScorer

ROUTE, INFO = "/score", "/info"
BATCH_REQUESTS = 16  # requests per scorer call (serve.batch)
BATCH_WAIT_S = 0.005  # how long a batch waits for more requests
RETRY_AFTER_S = 1  # what a 503 asks the client to wait
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def check_request(data: Any, required: list[str] | None = None) -> str | None:
    """What is wrong with a decoded request (None: it follows the contract), given the
    metadata columns the scorer requires."""
    if not isinstance(data, dict):
        return "the body must be a JSON object with 'prompts' and 'responses'"
    for name in ("prompts", "responses"):
        value = data.get(name)
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            return f"field '{name}' must be a list of strings"
    prompts, responses = data["prompts"], data["responses"]
    if len(prompts) != len(responses):
        return f"'prompts' has {len(prompts)} entries and 'responses' {len(responses)}"
    metadata = data.get("metadata")
    if metadata is not None and (
        not isinstance(metadata, list)
        or len(metadata) != len(responses)
        or not all(isinstance(m, dict) for m in metadata)
    ):
        return "field 'metadata' must be a list of objects, one per response"
    for column in required or []:
        rows = metadata or [{} for _ in responses]
        missing = [i for i, m in enumerate(rows) if column not in m]
        if missing:
            return (
                f"the reward function requires the column '{column}', missing from "
                f"metadata[{missing[0]}] ({len(missing)} of {len(rows)} objects lack it)"
            )
    return None


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


async def read_body(request: Request, limit: int) -> bytes | None:
    """The body, read chunk by chunk; None as soon as it is over ``limit`` bytes (a declared
    ``Content-Length`` over it is refused before reading)."""
    declared = request.headers.get("content-length") or ""
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


@serve.deployment
class RewardService:
    """One replica: a ``TextRewardScorer`` behind the HTTP contract."""

    def __init__(
        self,
        scorer_args: dict[str, Any],
        token_digest: bytes | None,
        max_body_bytes: int,
        max_queue: int,
    ):
        self.scorer = TextRewardScorer(**scorer_args)
        self.required = self.scorer.required_columns()
        self.info = self.scorer.shaping_info()
        self.token_digest = token_digest
        self.max_body_bytes = max_body_bytes
        self.max_queue = max_queue
        self.waiting = 0  # requests accepted and not yet answered

    def _authorized(self, request: Request) -> bool:
        if self.token_digest is None:
            return True
        given = _digest(request.headers.get("authorization", ""))
        return hmac.compare_digest(given, self.token_digest)

    async def __call__(self, request: Request) -> JSONResponse:
        if not self._authorized(request):
            return _error(401, "missing or wrong bearer token")
        path = request.url.path.rstrip("/")
        if request.method == "GET" and path.endswith(INFO):
            return JSONResponse(self.info)
        if request.method != "POST" or not path.endswith(ROUTE):
            return _error(405, "POST the request as JSON to .../score (or GET .../info)")
        if self.waiting >= self.max_queue:
            message = f"the queue is full ({self.max_queue} requests waiting); retry later"
            return _error(503, message, **{"Retry-After": str(RETRY_AFTER_S)})
        self.waiting += 1
        try:
            return await self._score(request)
        finally:
            self.waiting -= 1

    async def _score(self, request: Request) -> JSONResponse:
        body = await read_body(request, self.max_body_bytes)
        if body is None:
            return _error(413, f"the body is over the limit of {self.max_body_bytes} bytes")
        try:
            data = json.loads(body)
        except ValueError as exc:
            return _error(400, f"the body is not JSON: {exc}")
        problem = check_request(data, self.required)
        if problem is not None:
            return _error(422, problem)
        metadata = data.get("metadata") or [{} for _ in data["responses"]]
        try:
            scores = await self.score_batch((data["prompts"], data["responses"], metadata))
        except Exception as exc:  # the scorer's own error, whatever its type
            return _error(500, f"the scorer failed: {type(exc).__name__}: {exc}")
        return JSONResponse({"scores": scores})

    @serve.batch(max_batch_size=BATCH_REQUESTS, batch_wait_timeout_s=BATCH_WAIT_S)
    async def score_batch(self, items: list[tuple[list, list, list]]) -> list[list[float]]:
        """One scorer call (in a thread, off the event loop) for a batch of requests."""
        prompts = [p for item in items for p in item[0]]
        responses = [r for item in items for r in item[1]]
        metadata = [m for item in items for m in item[2]]
        scores = await asyncio.to_thread(self.scorer.score, prompts, responses, metadata)
        out, start = [], 0
        for item in items:
            out.append(scores[start : start + len(item[1])])
            start += len(item[1])
        return out


@dataclass(frozen=True)
class ServiceOptions:
    """Where and how a service runs (the ``serve-reward`` flags)."""

    name: str = "reward"
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    token_env: str | None = None
    max_body_mb: float = 16.0
    max_queue: int = 64
    tls_cert: str | None = None
    tls_key: str | None = None

    @classmethod
    def from_args(cls, args: Any) -> ServiceOptions:
        return cls(**{f: getattr(args, f) for f in cls.__dataclass_fields__})

    def http_options(self) -> dict[str, Any]:
        """Serve's HTTP options that decide where and how this service is reachable."""
        tls = [os.path.abspath(p) if p else None for p in (self.tls_cert, self.tls_key)]
        return {"host": self.host, "port": self.port, "ssl_certfile": tls[0], "ssl_keyfile": tls[1]}

    def url(self) -> str:
        scheme = "https" if self.tls_cert else "http"
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{shown}:{self.port}/{self.name}{ROUTE}"


def check_options(opts: ServiceOptions) -> str | None:
    """Refuses what cannot be served safely; returns the token (None: none). A non-loopback
    host needs a token, and without TLS gets a warning (the token travels in clear)."""
    if not _NAME.match(opts.name):
        raise UserError(f"--name {opts.name!r}: letters, digits, '-' and '_' only")
    if opts.replicas < 1:
        raise UserError(f"--replicas must be at least 1, got {opts.replicas}")
    if opts.max_queue < 1:
        raise UserError(f"--max-queue must be at least 1, got {opts.max_queue}")
    if (opts.tls_cert is None) != (opts.tls_key is None):
        raise UserError("--tls-cert and --tls-key go together (the certificate and its key)")
    for flag, path in (("--tls-cert", opts.tls_cert), ("--tls-key", opts.tls_key)):
        if path is not None and not os.path.isfile(path):
            raise UserError(f"{flag} {path}: no such file")
    token = os.environ.get(opts.token_env) if opts.token_env else None
    if opts.token_env and not token:
        raise UserError(f"--token-env: the environment variable {opts.token_env} is not set")
    if not is_loopback(opts.host):
        if token is None:
            raise UserError(
                f"--host {opts.host} is not a loopback address: serving rewards there needs a "
                "token (--token-env NAME, the environment variable holding it)"
            )
        if opts.tls_cert is None:
            print(
                f"WARNING: --host {opts.host} without --tls-cert/--tls-key: the token and the "
                "texts travel in clear over plain HTTP",
                file=sys.stderr,
                flush=True,
            )
    return token


def check_running_serve(opts: ServiceOptions) -> None:
    """Refuses to start beside a running Serve that listens elsewhere (Serve would ignore this
    service's HTTP options: it could serve on a host nobody asked for), or beside an app of the
    same name (``serve.run`` would replace it)."""
    from ray.serve.context import _get_global_client  # the running Serve's HTTP options

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return
    have = client.http_config
    differ = {k: (getattr(have, k), v) for k, v in opts.http_options().items()}
    differ = {k: pair for k, pair in differ.items() if pair[0] != pair[1]}
    if differ:
        shown = ", ".join(f"{k} {a!r} (asked: {b!r})" for k, (a, b) in differ.items())
        raise UserError(
            f"Ray Serve already runs on this cluster with other HTTP options: {shown}. Serve has "
            "one HTTP proxy per cluster and would ignore this service's options: ask for the "
            "same --host/--port/--tls-cert/--tls-key, or use another cluster"
        )
    if opts.name in serve.status().applications:
        raise UserError(
            f"a Serve app named {opts.name!r} already runs on this cluster (another service?): "
            "give this one its own --name"
        )


def serve_reward(scorer_args: dict[str, Any], opts: ServiceOptions) -> str:
    """Start the app on the connected Ray cluster; returns the URL to put in
    ``reward.remote.url``."""
    token = check_options(opts)
    check_running_serve(opts)
    serve.start(http_options=opts.http_options())
    digest = _digest(f"Bearer {token}") if token is not None else None
    # serve.deployment made RewardService a Deployment, which has options()
    app = RewardService.options(  # type: ignore[attr-defined]
        name=f"{opts.name}-service",
        num_replicas=opts.replicas,
        max_ongoing_requests=opts.max_queue + BATCH_REQUESTS,  # the overflow reaches a 503
        ray_actor_options={"num_cpus": opts.num_cpus, "num_gpus": opts.num_gpus},
    ).bind(scorer_args, digest, int(opts.max_body_mb * 2**20), opts.max_queue)
    serve.run(app, name=opts.name, route_prefix=f"/{opts.name}")
    return opts.url()


def stop_service(name: str) -> None:
    """Delete this service's app only (others on the cluster keep serving)."""
    if name in serve.status().applications:
        serve.delete(name)


def serve_from_args(args: Any, search_path: list[str]) -> int:
    """``rlhf-ray serve-reward``: join ``--address`` (or ``$RAY_ADDRESS``; else a local Ray),
    start the service, print its URL and keep it up until Ctrl-C or SIGTERM."""
    opts = ServiceOptions.from_args(args)
    if args.reward_model is not None and not os.path.isdir(args.reward_model):
        raise UserError(f"--reward-model {args.reward_model}: no such model directory")
    scorer_args = {
        "reward_model": args.reward_model,
        "function": args.function,
        "search_path": search_path,
    }
    check_options(opts)  # before starting anything
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a clean shutdown on SIGTERM too
    address = args.address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address, include_dashboard=False if address == "local" else None)
    started = False
    try:
        url = serve_reward(scorer_args, opts)
        started = True
        print(f"serving rewards at {url}  (reward.remote.url={url})", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        if started:
            stop_service(opts.name)
        if address == "local":
            serve.shutdown()  # the cluster is this process's own
        ray.shutdown()
