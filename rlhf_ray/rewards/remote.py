"""The client of a remote reward service (``reward.remote``), over ``httpx``.

The contract (README, "Remote rewards"):

- request: ``POST url`` with JSON ``{"prompts": [str], "responses": [str]}``, plus
  ``"metadata": [object]`` (one per response: its prompt row's other columns) when the prompt
  rows carry any; ``Authorization: Bearer <token>`` when ``token_env`` is set;
- answer: ``200 {"scores": [float]}``, one finite number per response, in order.

Responses go in batches of ``batch_size``, at most ``max_concurrency`` requests at once.
Connection errors, timeouts, 429 and 5xx are retried ``max_retries`` times with exponential
backoff and jitter; other statuses fail at once; a malformed answer fails naming the field.
Every failure is a ``RemoteRewardError`` naming the URL, and for HTTP errors the status.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx

from rlhf_ray.config.rewards import RemoteRewardConfig
from rlhf_ray.errors import UserError


class RemoteRewardError(UserError, RuntimeError):
    """The reward service failed, refused or answered something unusable."""


@dataclass
class RemoteStats:
    """Mean seconds per successful request, and retries made, over one ``score`` call."""

    latency_s: float = 0.0
    retries: int = 0


def bearer_headers(cfg: RemoteRewardConfig, setting: str = "reward.remote") -> dict[str, str]:
    """The ``Authorization`` header of ``cfg.token_env`` (none without one)."""
    if cfg.token_env is None:
        return {}
    token = os.environ.get(cfg.token_env)
    if not token:
        raise RemoteRewardError(
            f"{setting}.token_env: the environment variable {cfg.token_env} is not set"
        )
    return {"Authorization": f"Bearer {token}"}


def request_body(
    prompts: Sequence[str], responses: Sequence[str], metadata: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """The JSON request of the contract (``metadata`` only when some row has a column)."""
    body: dict[str, Any] = {"prompts": list(prompts), "responses": list(responses)}
    if any(metadata):
        body["metadata"] = [dict(m) for m in metadata]
    return body


def parse_scores(text: str, expected: int, url: str) -> list[float]:
    """The ``scores`` of an answer; a ``RemoteRewardError`` naming the field otherwise."""
    try:
        answer = json.loads(text)
    except ValueError:
        raise RemoteRewardError(f"{url}: the answer is not JSON: {text[:200]!r}") from None
    if not isinstance(answer, dict) or "scores" not in answer:
        raise RemoteRewardError(f"{url}: the answer has no field 'scores': {text[:200]!r}")
    scores = answer["scores"]
    if not isinstance(scores, list) or len(scores) != expected:
        got = f"{len(scores)} values" if isinstance(scores, list) else type(scores).__name__
        raise RemoteRewardError(
            f"{url}: field 'scores' has {got} for {expected} responses (one number per response)"
        )
    for i, s in enumerate(scores):
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise RemoteRewardError(f"{url}: field 'scores'[{i}] is not a finite number: {s!r}")
    return [float(s) for s in scores]


def _retryable(status: int) -> bool:
    return status == 429 or status >= 500


class RemoteReward:
    """Scores ``(prompts, responses, metadata)`` through the service of ``cfg``."""

    def __init__(self, cfg: RemoteRewardConfig, setting: str = "reward.remote"):
        self.cfg = cfg
        self.setting = setting
        self.client = httpx.Client(timeout=cfg.timeout_s, headers=bearer_headers(cfg, setting))

    def post(self, body: dict[str, Any], expected: int) -> tuple[list[float], float, int]:
        """One request with its retries: ``(scores, seconds of the answered attempt, retries)``."""
        cfg, why = self.cfg, ""
        for attempt in range(cfg.max_retries + 1):
            if attempt:
                time.sleep(cfg.backoff_s * 2 ** (attempt - 1) * random.uniform(1.0, 1.5))
            started = time.perf_counter()
            try:
                answer = self.client.post(cfg.url, json=body)
            except httpx.TransportError as exc:  # connection refused/reset, timeouts
                why = f"{type(exc).__name__}: {exc}"
                continue
            if answer.status_code == 200:
                scores = parse_scores(answer.text, expected, cfg.url)
                return scores, time.perf_counter() - started, attempt
            why = f"HTTP {answer.status_code} {answer.text[:200]!r}"
            if not _retryable(answer.status_code):
                raise RemoteRewardError(f"{cfg.url} answered {why} (not retried)")
        raise RemoteRewardError(
            f"{cfg.url}: no usable answer after {cfg.max_retries + 1} attempts "
            f"({self.setting}.max_retries={cfg.max_retries}); last: {why}"
        )

    def score(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        metadata: Sequence[dict[str, Any]] | None = None,
    ) -> tuple[list[float], RemoteStats]:
        """One score per response, in order (all batches, or an error: never a part)."""
        metadata = metadata if metadata is not None else [{} for _ in responses]
        size = self.cfg.batch_size
        cuts = [slice(i, i + size) for i in range(0, len(responses), size)]
        bodies = [request_body(prompts[c], responses[c], metadata[c]) for c in cuts]
        with ThreadPoolExecutor(self.cfg.max_concurrency) as pool:
            answers = list(pool.map(lambda b: self.post(b, len(b["responses"])), bodies))
        scores = [s for answer in answers for s in answer[0]]
        latency = sum(a[1] for a in answers) / max(len(answers), 1)
        return scores, RemoteStats(latency, sum(a[2] for a in answers))

    def close(self) -> None:
        self.client.close()


def probe(
    cfg: RemoteRewardConfig,
    metadata: dict[str, Any] | None = None,
    setting: str = "reward.remote",
    timeout_s: float = 10.0,
) -> None:
    """One request, no retries (preflight): an unreachable service, a refused token or an
    unusable answer raises ``RemoteRewardError`` naming the URL and the status."""
    body = request_body(["Hello"], ["Hello."], [metadata or {}])
    try:
        headers = bearer_headers(cfg, setting)
        timeout = min(cfg.timeout_s, timeout_s)
        answer = httpx.post(cfg.url, json=body, headers=headers, timeout=timeout)
    except httpx.TransportError as exc:
        raise RemoteRewardError(
            f"{setting}.url {cfg.url} is unreachable ({type(exc).__name__}: {exc})"
        ) from None
    if answer.status_code != 200:
        hint = " (check the token in $" + cfg.token_env + ")" if cfg.token_env else ""
        raise RemoteRewardError(
            f"{setting}.url {cfg.url} answered the probe with HTTP {answer.status_code}"
            f"{hint if answer.status_code in (401, 403) else ''}: {answer.text[:200]!r}"
        )
    parse_scores(answer.text, 1, cfg.url)
