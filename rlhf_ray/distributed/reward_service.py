"""``rlhf-ray serve-reward``: a reward model or function behind the remote-reward contract, as
a Ray Serve deployment (``--replicas`` replicas with ``--num-gpus`` each).

``POST /score`` with ``{"prompts": [str], "responses": [str], "metadata"?: [object]}`` answers
``200 {"scores": [float]}``. A wrong or missing bearer token gets 401; a body over the size
limit 413; a body that is not JSON 400; JSON that does not follow the contract 422; each with
``{"error": message}``. It binds to loopback unless a token is set.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import sys
import time
from typing import Any

import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from rlhf_ray.errors import UserError
from rlhf_ray.workers.text_reward import TextRewardScorer

ROUTE = "/score"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_request(data: Any) -> str | None:
    """What is wrong with a decoded request (None: it follows the contract)."""
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
    return None


@serve.deployment
class RewardService:
    """One replica: a ``TextRewardScorer`` behind the HTTP contract."""

    def __init__(self, scorer_args: dict[str, Any], token: str | None, max_body_bytes: int):
        self.scorer = TextRewardScorer(**scorer_args)
        self.token = token
        self.max_body_bytes = max_body_bytes

    async def __call__(self, request: Request) -> JSONResponse:
        if request.method != "POST":
            return JSONResponse({"error": "POST the request as JSON"}, status_code=405)
        if self.token is not None and request.headers.get("authorization") != (
            f"Bearer {self.token}"
        ):
            return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401)
        size = int(request.headers.get("content-length") or 0)
        body = b"" if size > self.max_body_bytes else await request.body()
        if size > self.max_body_bytes or len(body) > self.max_body_bytes:
            message = f"the body is over the limit of {self.max_body_bytes} bytes"
            return JSONResponse({"error": message}, status_code=413)
        try:
            data = json.loads(body)
        except ValueError as exc:
            return JSONResponse({"error": f"the body is not JSON: {exc}"}, status_code=400)
        problem = check_request(data)
        if problem is not None:
            return JSONResponse({"error": problem}, status_code=422)
        scores = self.scorer.score(data["prompts"], data["responses"], data.get("metadata"))
        return JSONResponse({"scores": scores})


def service_token(host: str, token_env: str | None) -> str | None:
    """The bearer token of ``token_env``; refuses a non-loopback ``host`` without one."""
    token = os.environ.get(token_env) if token_env else None
    if token_env and not token:
        raise UserError(f"--token-env: the environment variable {token_env} is not set")
    if token is None and not is_loopback(host):
        raise UserError(
            f"--host {host} is not a loopback address: serving rewards there needs a token "
            "(--token-env NAME, the environment variable holding it)"
        )
    return token


def serve_reward(
    scorer_args: dict[str, Any],
    host: str,
    port: int,
    replicas: int,
    num_gpus: float,
    num_cpus: float,
    token_env: str | None,
    max_body_mb: float,
) -> str:
    """Start the deployment on the connected Ray cluster; returns the URL to put in
    ``reward.remote.url``."""
    token = service_token(host, token_env)
    serve.start(http_options={"host": host, "port": port})
    # serve.deployment made RewardService a Deployment, which has options()
    app = RewardService.options(  # type: ignore[attr-defined]
        num_replicas=replicas, ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus}
    ).bind(scorer_args, token, int(max_body_mb * 2**20))
    serve.run(app, name="reward", route_prefix=ROUTE)
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}{ROUTE}"


def serve_from_args(args: Any, search_path: list[str]) -> int:
    """``rlhf-ray serve-reward``: join ``--address`` (or ``$RAY_ADDRESS``; else a local Ray),
    start the service, print its URL and keep it up until Ctrl-C or SIGTERM."""
    if args.replicas < 1:
        raise UserError(f"--replicas must be at least 1, got {args.replicas}")
    if args.reward_model is not None and not os.path.isdir(args.reward_model):
        raise UserError(f"--reward-model {args.reward_model}: no such model directory")
    scorer_args = {
        "reward_model": args.reward_model,
        "function": args.function,
        "search_path": search_path,
    }
    service_token(args.host, args.token_env)  # before starting anything
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a clean shutdown on SIGTERM too
    address = args.address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address, include_dashboard=False if address == "local" else None)
    try:
        url = serve_reward(
            scorer_args,
            args.host,
            args.port,
            args.replicas,
            args.num_gpus,
            args.num_cpus,
            args.token_env,
            args.max_body_mb,
        )
        print(f"serving rewards at {url}  (reward.remote.url={url})", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()
