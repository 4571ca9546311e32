"""``serve-reward`` apps side by side on one cluster (Ray Serve in this test's own Ray): each
its own app and route, a second never replaces the first, exiting one leaves the other serving;
a Serve already listening elsewhere is refused; the documented answers to a missing column, a
body over the limit and a full queue. Loopback only."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from rlhf_ray.distributed.reward_service import (
    ServiceOptions,
    check_options,
    serve_reward,
    stop_service,
)
from rlhf_ray.errors import UserError
from tests.conftest import REPO

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _function(name: str) -> dict:
    return {"reward_model": None, "function": name, "search_path": [str(REPO)]}


@pytest.fixture(scope="module")
def services(ray_cluster):
    from ray import serve

    port = _free_port()
    base = ServiceOptions(port=port, num_cpus=0.1, max_body_mb=0.01)
    urls = {
        "lower": serve_reward(
            _function("rlhf_ray.rewards:lowercase_fraction"),
            ServiceOptions(**{**base.__dict__, "name": "lower"}),
        ),
        "label": serve_reward(
            _function("tests.helpers.reward_fns:label_term"),
            ServiceOptions(**{**base.__dict__, "name": "label"}),
        ),
    }
    try:
        yield base, urls
    finally:
        serve.shutdown()


def _post(url: str, body: dict) -> httpx.Response:
    return httpx.post(url, json=body, timeout=60)


def test_two_services_serve_side_by_side_each_on_its_route(services):
    base, urls = services
    assert urls["lower"] == f"http://127.0.0.1:{base.port}/lower/score"
    assert _post(urls["lower"], {"prompts": ["p"], "responses": ["ab C"]}).json() == {
        "scores": [0.75]
    }
    rows = {"prompts": ["Tell me about item 3."], "responses": ["3"], "metadata": [{"label": "3"}]}
    assert _post(urls["label"], rows).status_code == 200
    info = httpx.get(urls["lower"].replace("/score", "/info"), timeout=30).json()
    assert info == {
        "source": "function",
        "normalize": "none",
        "score_mean": None,
        "score_std": None,
    }


def test_a_service_with_a_taken_name_or_other_http_options_is_refused(services):
    base, _ = services
    with pytest.raises(UserError, match="a Serve app named 'lower' already runs"):
        serve_reward(
            _function("rlhf_ray.rewards:lowercase_fraction"),
            ServiceOptions(**{**base.__dict__, "name": "lower"}),
        )
    other_port = ServiceOptions(**{**base.__dict__, "name": "third", "port": _free_port()})
    with pytest.raises(
        UserError, match="already runs on this cluster with other HTTP options: port"
    ):
        serve_reward(_function("rlhf_ray.rewards:lowercase_fraction"), other_port)


def test_a_missing_required_column_gets_a_422_naming_it(services):
    _, urls = services
    for body in (
        {"prompts": ["a", "b"], "responses": ["c", "d"]},
        {"prompts": ["a", "b"], "responses": ["c", "d"], "metadata": [{"label": 1}, {"x": 2}]},
    ):
        answer = _post(urls["label"], body)
        assert answer.status_code == 422
        assert "requires the column 'label'" in answer.json()["error"]
    assert "metadata[1]" in answer.json()["error"]


def test_a_streamed_body_over_the_limit_gets_a_413(services):
    _, urls = services

    def chunks():  # no Content-Length: chunked transfer, checked while read
        yield b'{"prompts": ["a"], "responses": ["'
        for _ in range(20):
            yield b"x" * 1024
        yield b'"]}'

    answer = httpx.post(urls["lower"], content=chunks(), timeout=60)
    assert answer.status_code == 413 and "over the limit" in answer.json()["error"]


def test_a_full_queue_answers_503_with_retry_after(services):
    base, _ = services
    opts = ServiceOptions(**{**base.__dict__, "name": "slow", "max_queue": 2})
    url = serve_reward(_function("tests.helpers.reward_fns:slow_length"), opts)
    with ThreadPoolExecutor(6) as pool:
        answers = list(
            pool.map(lambda i: _post(url, {"prompts": ["p"], "responses": ["x" * i]}), range(6))
        )
    codes = sorted(a.status_code for a in answers)
    assert codes.count(200) >= 2 and codes.count(503) >= 1, codes
    busy = next(a for a in answers if a.status_code == 503)
    assert busy.headers["retry-after"] == "1" and "queue is full" in busy.json()["error"]
    ok = [(i, a.json()["scores"]) for i, a in enumerate(answers) if a.status_code == 200]
    assert all(scores == [float(i)] for i, scores in ok)  # each its own request's score
    stop_service("slow")


def test_exiting_one_service_leaves_the_other_serving(services):
    _, urls = services
    stop_service("lower")
    assert _post(urls["lower"], {"prompts": ["p"], "responses": ["a"]}).status_code == 404
    rows = {"prompts": ["Tell me about item 3."], "responses": ["3"], "metadata": [{"label": "3"}]}
    assert _post(urls["label"], rows).status_code == 200


def test_a_public_host_needs_a_token_and_warns_without_tls(monkeypatch, capsys):
    # refused or warned before anything is started or sent: no traffic leaves loopback
    with pytest.raises(UserError, match="not a loopback address"):
        check_options(ServiceOptions(host="10.1.2.3"))
    monkeypatch.setenv("RR_TOKEN", "sesame")
    assert check_options(ServiceOptions(host="10.1.2.3", token_env="RR_TOKEN")) == "sesame"
    assert "travel in clear over plain HTTP" in capsys.readouterr().err
    with pytest.raises(UserError, match="--tls-cert and --tls-key go together"):
        check_options(ServiceOptions(tls_cert="c.pem"))
