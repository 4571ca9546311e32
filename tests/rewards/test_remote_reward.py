"""The ``reward.remote`` client against a standard-library server in a thread: the contract,
the retry rules, strict answers, the preflight probe."""

from __future__ import annotations

import math
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from rlhf_ray.config.rewards import RemoteRewardConfig
from rlhf_ray.rewards import remote
from rlhf_ray.rewards.remote import RemoteOptions, RemoteReward, RemoteRewardError, probe
from tests.helpers.reward_servers import RewardServer, lowercase_fraction

PROMPTS = [f"prompt {i}" for i in range(5)]
RESPONSES = ["abc", "ABC", "a B", "xyz zz", "Q"]


@pytest.fixture(scope="module")
def server():
    s = RewardServer(token="sesame")
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def reset(server, monkeypatch):
    server.mode, server.requests = "ok", []
    monkeypatch.setenv("RR_TOKEN", "sesame")


def client(server, **kw) -> RemoteReward:
    cfg = {"url": server.url, "token_env": "RR_TOKEN", "backoff_s": 0.01, **kw}
    return RemoteReward(RemoteRewardConfig(**cfg))


def test_scores_come_back_in_order_in_batches_with_metadata(server):
    metadata = [{"label": i} for i in range(5)]
    scores, stats = client(server, batch_size=2, max_concurrency=2).score(
        PROMPTS, RESPONSES, metadata
    )
    assert scores == pytest.approx([lowercase_fraction(r) for r in RESPONSES])
    assert sorted(len(b["responses"]) for b in server.requests) == [1, 2, 2]
    sent = [
        (p, m["label"])
        for b in server.requests
        for p, m in zip(b["prompts"], b["metadata"], strict=True)
    ]
    assert sorted(sent) == [(f"prompt {i}", i) for i in range(5)]  # each with its own row
    assert stats.retries == 0 and stats.latency_s > 0


def test_no_metadata_key_without_columns(server):
    client(server).score(PROMPTS, RESPONSES, [{} for _ in RESPONSES])
    assert set(server.requests[0]) == {"prompts", "responses"}


@pytest.mark.parametrize(
    ("mode", "field"),
    [
        ("not_json", "not JSON"),
        ("no_scores", "no field 'scores'"),
        ("short", "field 'scores' has 4 values for 5 responses"),
        ("nan", "field 'scores'[0] is not a finite number"),
        ("huge_int", "field 'scores'[0] is not a finite number: inf"),
        ("huge_exp", "field 'scores'[0] is not a finite number: inf"),
    ],
)
def test_malformed_answers_name_the_field_and_are_not_retried(server, mode, field):
    server.mode = mode
    n = 1 if mode == "huge_int" else 5  # its answer holds one (5000-digit) number
    with pytest.raises(RemoteRewardError, match=re.escape(field)) as err:
        client(server).score(PROMPTS[:n], RESPONSES[:n])
    assert server.url in str(err.value) and len(server.requests) == 1


def test_a_refused_token_is_not_retried_and_names_url_and_status(server, monkeypatch):
    monkeypatch.setenv("RR_TOKEN", "wrong")
    with pytest.raises(RemoteRewardError, match="answered HTTP 401") as err:
        client(server).score(PROMPTS, RESPONSES)
    assert server.url in str(err.value) and len(server.requests) == 1


@pytest.mark.parametrize("status", ["500", "429"])
def test_5xx_and_429_are_retried_then_give_up_naming_status_and_attempts(server, status):
    server.mode = status
    with pytest.raises(RemoteRewardError, match=f"after 3 attempts.*HTTP {status}") as err:
        client(server, max_retries=2).score(PROMPTS, RESPONSES)
    assert server.url in str(err.value) and len(server.requests) == 3


def test_a_flaky_server_is_retried_and_the_retries_counted(server):
    server.mode = "flaky:2"
    scores, stats = client(server, max_retries=3).score(PROMPTS, RESPONSES)
    assert len(scores) == 5 and stats.retries == 2


def test_a_slow_reply_times_out_and_is_retried(server):
    server.mode, server.slow_s = "slow", 1.0
    started = time.monotonic()
    with pytest.raises(RemoteRewardError, match="after 2 attempts.*ReadTimeout"):
        client(server, timeout_s=0.2, max_retries=1).score(PROMPTS, RESPONSES)
    assert time.monotonic() - started < 5 and len(server.requests) == 2


def test_unreachable_is_retried_with_backoff_then_named():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    url = f"http://127.0.0.1:{port}/score"
    cfg = RemoteRewardConfig(url=url, max_retries=2, backoff_s=0.05)
    started = time.monotonic()
    with pytest.raises(RemoteRewardError, match="after 3 attempts.*ConnectError"):
        RemoteReward(cfg).score(PROMPTS, RESPONSES)
    assert time.monotonic() - started >= 0.05 + 0.1  # waited 0.05 * 2^k * [1, 1.5] between


def test_probe_passes_and_fails_naming_url_and_status(server, monkeypatch):
    cfg = RemoteRewardConfig(url=server.url, token_env="RR_TOKEN")
    probe(cfg, {"label": 1})
    assert server.requests[-1]["metadata"] == [{"label": 1}]
    monkeypatch.setenv("RR_TOKEN", "wrong")
    with pytest.raises(RemoteRewardError, match=f"{server.url} answered the probe with HTTP 401"):
        probe(cfg)
    monkeypatch.delenv("RR_TOKEN")
    with pytest.raises(RemoteRewardError, match="RR_TOKEN is not set"):
        probe(cfg)


def test_nan_is_not_a_score():
    from rlhf_ray.rewards.remote import parse_scores

    assert parse_scores('{"scores": [1, 2.5]}', 2, "u") == [1.0, 2.5]
    for bad in ('{"scores": [true]}', '{"scores": ["1"]}', '{"scores": [Infinity]}'):
        with pytest.raises(RemoteRewardError):
            parse_scores(bad, 1, "u")
    assert not math.isnan(parse_scores('{"scores": [0]}', 1, "u")[0])


@pytest.mark.parametrize("case", ["wrong token", "unreachable"])
def test_ppo_exits_2_within_seconds_before_any_actor(server, tmp_path, case):
    url = server.url if case == "wrong token" else "http://127.0.0.1:9/score"
    env = {**os.environ, "RR_TOKEN": "wrong"}
    overrides = [f"reward.remote.url={url}", "reward.remote.token_env=RR_TOKEN"]
    command = [sys.executable, "-m", "rlhf_ray.cli", "ppo", "--run-dir", str(tmp_path / "run")]
    started = time.monotonic()
    proc = subprocess.run(
        [*command, "reward.function=null", *overrides],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    print(f"{case}: exit 2 after {time.monotonic() - started:.1f} s")  # no actor: imports only
    status = "HTTP 401" if case == "wrong token" else "unreachable"
    assert url in proc.stderr and status in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


def test_metadata_is_strict_json_nan_becomes_null(server):
    metadata = [{"x": float("nan"), "y": [1.0, float("inf")]}] + [{"x": 1.0}] * 4
    client(server).score(PROMPTS, RESPONSES, metadata)
    sent = server.requests[0]["metadata"]
    assert sent[0] == {"x": None, "y": [1.0, None]} and sent[1] == {"x": 1.0}


def test_a_column_json_cannot_hold_is_refused_naming_it_before_any_request(server):
    import datetime

    rows = [{"label": 1}, {"label": 2, "when": datetime.datetime(2026, 1, 1)}]
    with pytest.raises(RemoteRewardError, match="column 'when' of prompt row 1 cannot be sent"):
        remote.check_metadata(rows, "reward.remote")
    with pytest.raises(RemoteRewardError, match="column 'when' of prompt row 1"):
        client(server).score(PROMPTS[:2], RESPONSES[:2], rows)
    assert server.requests == []


def test_a_busy_service_is_waited_for_as_its_retry_after_asks(server, monkeypatch):
    slept = []
    monkeypatch.setattr(remote.time, "sleep", slept.append)
    server.mode = "busy:2"  # 503 + Retry-After: 2, twice
    scores, stats = client(server, max_retries=3).score(PROMPTS, RESPONSES)
    assert len(scores) == 5 and stats.retries == 2
    assert slept == [2.0, 2.0]  # not the 0.01 s backoff


def test_retries_stop_at_the_budget_naming_url_attempts_and_last_status(server):
    server.mode, server.slow_s = "slow", 1.5
    options = RemoteOptions(budget_s=0.5)
    cfg = RemoteRewardConfig(url=server.url, token_env="RR_TOKEN", max_retries=5, backoff_s=0.01)
    with pytest.raises(RemoteRewardError) as err:
        RemoteReward(cfg, options=options).score(PROMPTS, RESPONSES)
    message = str(err.value)
    assert server.url in message and "after 1 attempts" in message
    assert "retry budget 0.5 s" in message and "ReadTimeout" in message
    assert len(server.requests) == 1  # 5 retries allowed, none fitted in the budget


def test_driver_options_carry_the_token_and_never_show_it(monkeypatch):
    from rlhf_ray.config.ppo import RewardConfig

    reward = RewardConfig(
        function=None, remote={"url": "http://127.0.0.1:1/score", "token_env": "RR_TOKEN"}
    )
    options = remote.driver_options(reward, 100.0)
    assert options.tokens == {"RR_TOKEN": "sesame"} and options.budget_s == pytest.approx(90.0)
    assert "sesame" not in repr(options)
    monkeypatch.delenv("RR_TOKEN")
    with pytest.raises(RemoteRewardError, match="RR_TOKEN is not set"):
        remote.driver_options(reward, 100.0)


def test_the_actor_uses_the_token_it_was_handed_not_its_environment(server, monkeypatch):
    monkeypatch.delenv("RR_TOKEN")  # an actor on another node: the driver's variable is absent
    cfg = RemoteRewardConfig(url=server.url, token_env="RR_TOKEN")
    scores, _ = RemoteReward(cfg, options=RemoteOptions({"RR_TOKEN": "sesame"})).score(
        PROMPTS, RESPONSES
    )
    assert len(scores) == 5


@pytest.mark.parametrize("host", ["10.1.2.3", "reward.example"])
def test_a_token_over_http_to_another_host_is_refused_by_the_config(host):
    url = f"http://{host}:8000/score"
    with pytest.raises(
        ValueError,
        match=f"in clear over http:// to the non-loopback host of url '{re.escape(url)}'",
    ):
        RemoteRewardConfig(url=url, token_env="RR_TOKEN")
    RemoteRewardConfig(url=f"https://{host}/score", token_env="RR_TOKEN")  # TLS: fine
    RemoteRewardConfig(url=url)  # no token to leak: fine
    RemoteRewardConfig(url=url, token_env="RR_TOKEN", allow_token_over_http=True)  # opted in


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    from tests.helpers.certs import self_signed

    root = tmp_path_factory.mktemp("tls")
    cert, key = self_signed(root, "service")
    other, _ = self_signed(root, "other")
    s = RewardServer(token="sesame", tls=(cert, key))
    yield s, cert, other
    s.stop()


def test_tls_is_verified_against_the_ca_bundle(tls_server):
    s, cert, other = tls_server
    assert s.url.startswith("https://127.0.0.1:")
    ok = RemoteRewardConfig(url=s.url, token_env="RR_TOKEN", ca_bundle=cert)
    assert len(RemoteReward(ok).score(PROMPTS, RESPONSES)[0]) == 5
    probe(ok)
    before = len(s.requests)
    for ca in (other, None):  # another certificate; the system store (which lacks this one)
        bad = RemoteRewardConfig(url=s.url, token_env="RR_TOKEN", ca_bundle=ca, max_retries=3)
        with pytest.raises(RemoteRewardError, match="TLS certificate was refused") as err:
            RemoteReward(bad).score(PROMPTS, RESPONSES)
        assert s.url in str(err.value)
        with pytest.raises(RemoteRewardError, match="CERTIFICATE_VERIFY_FAILED"):
            probe(bad)
    assert len(s.requests) == before  # nothing was sent over an unverified connection
