"""The client of a remote reward service (``reward.remote``), over ``httpx``.

The contract (README, "Remote rewards"):

- request: ``POST url`` with strict JSON ``{"prompts": [str], "responses": [str]}``, plus
  ``"metadata": [object]`` (one per response: its prompt row's other columns, NaN and
  infinities sent as ``null``) when the prompt rows carry any; ``Authorization: Bearer <token>``
  when ``token_env`` is set;
- answer: ``200 {"scores": [float]}``, one finite number per response, in order.

Responses go in batches of ``batch_size``, at most ``max_concurrency`` requests at once.
Connection errors, timeouts, 429 and 5xx are retried ``max_retries`` times with exponential
backoff and jitter (at least the ``Retry-After`` a 429/503 asks for), all within the retry
budget (``RemoteOptions.budget_s``, a share of ``train.phase_timeout_s``); other statuses fail at
once; a malformed answer fails naming the field. Every failure is a ``RemoteRewardError`` naming
the URL, and for HTTP errors the attempts and the last status.

Tokens: the driver reads each ``token_env`` from its own environment and hands the values to the
reward actors as ``RemoteOptions`` (a constructor argument, never printed): on a cluster the
driver's environment does not reach the actors, and a Ray ``runtime_env`` is written into Ray's
own logs. Certificates are verified against ``ca_bundle`` or the system's trust store.
"""

from __future__ import annotations

import email.utils
import json
import math
import os
import random
import ssl
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class RemoteOptions:
    """What the driver hands the reward scorers beside the config: the tokens it read
    (``token_env`` name -> value; kept out of ``repr``) and the retry budget of one scoring
    call in seconds (None: no budget beyond ``max_retries``)."""

    tokens: dict[str, str] = field(default_factory=dict, repr=False)
    budget_s: float | None = None


BUDGET_SHARE = 0.9  # of train.phase_timeout_s: the service's error comes before the phase's


def remote_configs(reward: Any) -> list[tuple[str, RemoteRewardConfig]]:
    """``(setting, config)`` of every service of a ``RewardConfig``: the main one and terms'."""
    found = [("reward.remote", reward.remote)] if reward.remote is not None else []
    found += [(f"reward.terms[{t.name}].remote", t.remote) for t in reward.terms if t.remote]
    return found


def driver_options(reward: Any, phase_timeout_s: float | None) -> RemoteOptions:
    """The ``RemoteOptions`` of a run, read on the driver: each service's token from this
    process's environment, and a budget of ``BUDGET_SHARE`` of the phase timeout."""
    tokens = {}
    for setting, cfg in remote_configs(reward):
        if cfg.token_env is not None:
            tokens[cfg.token_env] = _token(cfg.token_env, setting, None)
    budget = BUDGET_SHARE * phase_timeout_s if phase_timeout_s else None
    return RemoteOptions(tokens, budget)


def _token(name: str, setting: str, tokens: dict[str, str] | None) -> str:
    token = (tokens or {}).get(name) or os.environ.get(name)
    if not token:
        raise RemoteRewardError(f"{setting}.token_env: the environment variable {name} is not set")
    return token


def bearer_headers(
    cfg: RemoteRewardConfig, setting: str = "reward.remote", tokens: dict[str, str] | None = None
) -> dict[str, str]:
    """The ``Authorization`` header of ``cfg.token_env`` (none without one), from ``tokens``
    or else this process's environment."""
    if cfg.token_env is None:
        return {}
    return {"Authorization": f"Bearer {_token(cfg.token_env, setting, tokens)}"}


def tls_verify(cfg: RemoteRewardConfig) -> ssl.SSLContext:
    """The certificate check of an https:// service: ``ca_bundle``, else the system store."""
    try:
        return ssl.create_default_context(cafile=cfg.ca_bundle)
    except (OSError, ssl.SSLError) as exc:
        raise RemoteRewardError(
            f"ca_bundle {cfg.ca_bundle}: cannot be read as PEM: {exc}"
        ) from None


def strict(value: Any) -> Any:
    """``value`` with every NaN and infinity replaced by None (strict JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def check_metadata(columns: Sequence[dict[str, Any]], setting: str = "reward.remote") -> None:
    """Every column value can be sent as strict JSON; else a ``RemoteRewardError`` naming the
    column and the prompt row (the preflight runs it over the whole prompt set)."""
    for i, row in enumerate(columns):
        for name, value in row.items():
            try:
                json.dumps(strict(value), allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise RemoteRewardError(
                    f"{setting}: column {name!r} of prompt row {i} cannot be sent as JSON "
                    f"({type(value).__name__}: {exc}); make it a string or number in the data"
                ) from None


def request_body(
    prompts: Sequence[str], responses: Sequence[str], metadata: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """The JSON request of the contract (``metadata`` only when some row has a column)."""
    body: dict[str, Any] = {"prompts": list(prompts), "responses": list(responses)}
    if any(metadata):
        body["metadata"] = [strict(dict(m)) for m in metadata]
    return body


def encode(body: dict[str, Any], setting: str) -> bytes:
    """``body`` as strict JSON bytes; a value JSON cannot hold is named by its column."""
    try:
        return json.dumps(body, allow_nan=False).encode()
    except (TypeError, ValueError):
        check_metadata(body.get("metadata", []), setting)
        raise


def _number(text: str) -> float | int:
    """json's integer parser, bounded: a huge integer becomes inf (then refused by name)."""
    return int(text) if len(text) <= 18 else float(text)


def parse_scores(text: str, expected: int, url: str) -> list[float]:
    """The ``scores`` of an answer; a ``RemoteRewardError`` naming the field otherwise."""
    try:
        answer = json.loads(text, parse_int=_number)
    except (ValueError, RecursionError):
        raise RemoteRewardError(f"{url}: the answer is not JSON: {text[:200]!r}") from None
    if not isinstance(answer, dict) or "scores" not in answer:
        raise RemoteRewardError(f"{url}: the answer has no field 'scores': {text[:200]!r}")
    scores = answer["scores"]
    if not isinstance(scores, list) or len(scores) != expected:
        got = f"{len(scores)} values" if isinstance(scores, list) else type(scores).__name__
        raise RemoteRewardError(
            f"{url}: field 'scores' has {got} for {expected} responses (one number per response)"
        )
    out = []
    for i, s in enumerate(scores):
        value = float(s) if isinstance(s, (int, float)) and not isinstance(s, bool) else None
        if value is None or not math.isfinite(value):
            shown = repr(s) if len(repr(s)) < 60 else repr(s)[:60] + "..."
            raise RemoteRewardError(f"{url}: field 'scores'[{i}] is not a finite number: {shown}")
        out.append(value)
    return out


def _certificate_refused(exc: BaseException) -> bool:
    """Whether a transport error is a failed certificate check (anywhere in its chain)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return "CERTIFICATE_VERIFY_FAILED" in str(exc)


def _retryable(status: int) -> bool:
    return status == 429 or status >= 500


def retry_after_s(answer: httpx.Response) -> float:
    """The wait a ``Retry-After`` header asks for (seconds or an HTTP date; 0 without one)."""
    value = answer.headers.get("retry-after")
    if not value:
        return 0.0
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return 0.0
    return max(0.0, when.timestamp() - time.time())


class RemoteReward:
    """Scores ``(prompts, responses, metadata)`` through the service of ``cfg``."""

    def __init__(
        self,
        cfg: RemoteRewardConfig,
        setting: str = "reward.remote",
        options: RemoteOptions | None = None,
    ):
        self.cfg = cfg
        self.setting = setting
        self.budget_s = options.budget_s if options is not None else None
        headers = bearer_headers(cfg, setting, options.tokens if options else None)
        headers["Content-Type"] = "application/json"
        verify = tls_verify(cfg) if cfg.url.startswith("https:") else True
        self.client = httpx.Client(timeout=cfg.timeout_s, headers=headers, verify=verify)

    def _wait(self, attempt: int, asked_s: float) -> float:
        backoff = self.cfg.backoff_s * 2 ** (attempt - 1) * random.uniform(1.0, 1.5)
        return max(backoff, asked_s)

    def post(
        self, body: bytes, expected: int, deadline: float | None = None
    ) -> tuple[list[float], float, int]:
        """One request with its retries, before ``deadline`` (``time.monotonic``): ``(scores,
        seconds of the answered attempt, retries)``."""
        cfg, why, asked, attempts = self.cfg, "no attempt", 0.0, 0
        for attempt in range(cfg.max_retries + 1):
            if attempt:
                wait = self._wait(attempt, asked)
                if deadline is not None and time.monotonic() + wait >= deadline:
                    break
                time.sleep(wait)
            timeout = cfg.timeout_s
            if deadline is not None:
                timeout = min(timeout, max(deadline - time.monotonic(), 0.01))
            started, attempts, asked = time.perf_counter(), attempts + 1, 0.0
            try:
                answer = self.client.post(cfg.url, content=body, timeout=timeout)
            except httpx.TransportError as exc:  # connection refused/reset, timeouts
                why = f"{type(exc).__name__}: {exc}"
                if _certificate_refused(exc):  # retrying cannot change the certificate
                    raise RemoteRewardError(
                        f"{cfg.url}: the service's TLS certificate was refused ({exc}); "
                        f"{self.setting}.ca_bundle={cfg.ca_bundle} (null: the system store)"
                    ) from None
                continue
            if answer.status_code == 200:
                scores = parse_scores(answer.text, expected, cfg.url)
                return scores, time.perf_counter() - started, attempt
            why = f"HTTP {answer.status_code} {answer.text[:200]!r}"
            if not _retryable(answer.status_code):
                raise RemoteRewardError(f"{cfg.url} answered {why} (not retried)")
            asked = retry_after_s(answer)
        budget = "" if self.budget_s is None else f", retry budget {self.budget_s:g} s"
        raise RemoteRewardError(
            f"{cfg.url}: no usable answer after {attempts} attempts "
            f"({self.setting}.max_retries={cfg.max_retries}{budget}); last: {why}"
        )

    def score(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        metadata: Sequence[dict[str, Any]] | None = None,
    ) -> tuple[list[float], RemoteStats]:
        """One score per response, in order (all batches, or an error: never a part)."""
        deadline = time.monotonic() + self.budget_s if self.budget_s is not None else None
        metadata = metadata if metadata is not None else [{} for _ in responses]
        size = self.cfg.batch_size
        cuts = [slice(i, i + size) for i in range(0, len(responses), size)]
        bodies = [
            (encode(request_body(prompts[c], responses[c], metadata[c]), self.setting), c)
            for c in cuts
        ]
        with ThreadPoolExecutor(self.cfg.max_concurrency) as pool:
            answers = list(
                pool.map(lambda b: self.post(b[0], len(responses[b[1]]), deadline), bodies)
            )
        scores = [s for answer in answers for s in answer[0]]
        latency = sum(a[1] for a in answers) / max(len(answers), 1)
        return scores, RemoteStats(latency, sum(a[2] for a in answers))

    def close(self) -> None:
        self.client.close()


def info_url(url: str) -> str | None:
    """The ``GET`` info route of a ``serve-reward`` URL (``.../score`` -> ``.../info``)."""
    return url[: -len("/score")] + "/info" if url.endswith("/score") else None


def service_info(cfg: RemoteRewardConfig, setting: str = "reward.remote") -> dict[str, Any] | None:
    """What a ``serve-reward`` service says about its scores (``GET .../info``: ``source``,
    ``normalize`` as in-process ``auto`` would resolve it, ``score_mean``/``score_std``); None
    for a service without the route (any other server of the contract)."""
    url = info_url(cfg.url)
    if url is None:
        return None
    verify = tls_verify(cfg) if url.startswith("https:") else True
    try:
        answer = httpx.get(
            url, headers=bearer_headers(cfg, setting), timeout=cfg.timeout_s, verify=verify
        )
    except httpx.TransportError as exc:
        raise RemoteRewardError(f"{setting}.url {url}: {type(exc).__name__}: {exc}") from None
    if answer.status_code in (404, 405, 501):  # no such route: not a serve-reward service
        return None
    try:
        info = answer.json() if answer.status_code == 200 else None
    except ValueError:
        info = None
    if not isinstance(info, dict) or info.get("normalize") not in ("running", "none"):
        raise RemoteRewardError(
            f"{setting}.url {url} answered HTTP {answer.status_code} without the service info "
            f"(source, normalize, score_mean, score_std): {answer.text[:200]!r}"
        )
    return info


def probe(
    cfg: RemoteRewardConfig,
    metadata: dict[str, Any] | None = None,
    setting: str = "reward.remote",
    timeout_s: float = 10.0,
) -> None:
    """One request, no retries (preflight): an unreachable service, a refused token or an
    unusable answer raises ``RemoteRewardError`` naming the URL and the status."""
    body = encode(request_body(["Hello"], ["Hello."], [metadata or {}]), setting)
    headers = {**bearer_headers(cfg, setting), "Content-Type": "application/json"}
    verify = tls_verify(cfg) if cfg.url.startswith("https:") else True
    try:
        timeout = min(cfg.timeout_s, timeout_s)
        answer = httpx.post(cfg.url, content=body, headers=headers, timeout=timeout, verify=verify)
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
