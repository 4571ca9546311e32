"""``rlhf-ray serve-reward`` as a user runs it (HTTPS with a certificate made here, a token,
its own app name): a reward model served with Ray Serve gives the in-process reward scorer's
scores for the same texts, the same shaped scores under ``reward.normalize`` auto and model, and
refuses what breaks the contract."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from conftest import wait_no_processes_under

from rlhf_ray.config.ppo import ModelSpec, RewardConfig, TokenizerConfig, resolve_tokenizer
from rlhf_ray.config.stages import load_rm_config
from rlhf_ray.data.tokenization import build_tokenizer
from rlhf_ray.stages import rm_role, run_train_rm
from rlhf_ray.workers.inprocess import InProcessStage
from rlhf_ray.workers.scorers import RewardScorer
from rlhf_ray.workers.text_reward import text_rollout
from tests.helpers.certs import self_signed

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PROMPTS = ["Human: hi\n\nAssistant:", "Tell me a joke.", "x"]
RESPONSES = [" hello there", " why did the chicken", ""]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_rm(root: Path) -> Path:
    """A reward model from `train-rm` (in process, 32 pairs, one epoch): RUN/reward_model."""
    rows = [
        {"prompt": f"Tell me about {i}.", "chosen": "a calm answer", "rejected": f"NO {i}!"}
        for i in range(32)
    ]
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [
        f"data.path={data}",
        "data.eval_fraction=0",
        "learner.engine=torch",
        "learner.num_ranks=1",
        "train.epochs=1",
        "train.batch_size=16",
        "logging.progress=false",
    ]
    cfg = load_rm_config(None, overrides)
    workers = InProcessStage(rm_role(cfg), cfg.train.dist_timeout_s)
    try:
        run_train_rm(cfg, workers, root / "rm")
    finally:
        workers.close()
    return root / "rm" / "reward_model"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """The CLI serving a saved reward model with a token; stopped with SIGTERM at the end."""
    root = tmp_path_factory.mktemp("serve")
    model = _train_rm(root)
    cert, key = self_signed(root, "service")
    other, _ = self_signed(root, "other")
    ray_tmp = tempfile.mkdtemp(prefix="rr-", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RR_TOKEN": "sesame"}
    env.pop("RAY_ADDRESS", None)
    command = [
        sys.executable,
        "-m",
        "rlhf_ray.cli",
        "serve-reward",
        "--reward-model",
        str(model),
        "--port",
        str(_free_port()),
        "--token-env",
        "RR_TOKEN",
        "--max-body-mb",
        "0.01",
        "--num-cpus",
        "0.5",
        "--name",
        "rm",
        "--tls-cert",
        cert,
        "--tls-key",
        key,
    ]
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url, lines = None, []
    deadline = time.monotonic() + 180
    while url is None and time.monotonic() < deadline and proc.poll() is None:
        line = proc.stdout.readline()
        lines.append(line)
        if line.startswith("serving rewards at "):
            url = line.split()[3]
    try:
        assert url is not None, "".join(lines[-40:])
        yield url, model, cert, other
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        left = wait_no_processes_under(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        assert not left, f"processes outlived serve-reward: {[p.pid for p in left]}"


CA: list[str] = []  # the service's certificate, set by the first test


def _post(url: str, body, token: str = "sesame") -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"}
    verify = ssl.create_default_context(cafile=CA[0])
    if isinstance(body, (bytes, str)):
        return httpx.post(url, content=body, headers=headers, timeout=60, verify=verify)
    return httpx.post(url, json=body, headers=headers, timeout=60, verify=verify)


def test_served_scores_equal_the_in_process_scorer(service):
    url, model, cert, _ = service
    CA[:] = [cert]
    assert url.startswith("https://127.0.0.1:") and url.endswith("/rm/score")
    answer = _post(url, {"prompts": PROMPTS, "responses": RESPONSES})
    assert answer.status_code == 200, answer.text
    served = answer.json()["scores"]
    tok_cfg = resolve_tokenizer(TokenizerConfig(), str(model))  # the model's own tokenizer
    scorer = RewardScorer(RewardConfig(function=None, model=ModelSpec(path=str(model))), tok_cfg)
    tok = build_tokenizer(tok_cfg)
    local = scorer.score(text_rollout(tok, PROMPTS, RESPONSES, scorer.max_length)).tolist()
    one_by_one = [
        _post(url, {"prompts": [p], "responses": [r]}).json()["scores"][0]
        for p, r in zip(PROMPTS, RESPONSES, strict=True)
    ]
    assert served == pytest.approx(local, abs=1e-5)
    assert one_by_one == pytest.approx(local, abs=1e-5)  # padding in a batch changes nothing


@pytest.mark.parametrize(
    ("body", "token", "status", "says"),
    [
        ({"prompts": ["a"], "responses": ["b"]}, "wrong", 401, "token"),
        (b"{not json", "sesame", 400, "not JSON"),
        ({"prompts": ["a"], "responses": ["b" * 20000]}, "sesame", 413, "over the limit"),
        ({"prompts": ["a", "b"], "responses": ["c"]}, "sesame", 422, "'prompts' has 2"),
        ({"prompts": ["a"], "responses": ["b"], "metadata": []}, "sesame", 422, "metadata"),
    ],
)
def test_what_breaks_the_contract_gets_a_4xx_with_a_message(service, body, token, status, says):
    CA[:] = [service[2]]
    answer = _post(service[0], body, token)
    assert answer.status_code == status and says in answer.json()["error"]


def test_a_public_address_without_a_token_is_refused():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlhf_ray.cli",
            "serve-reward",
            "--function",
            "rlhf_ray.rewards:lowercase_fraction",
            "--host",
            "0.0.0.0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "not a loopback address" in proc.stderr


def _local_scores(model: Path, prompts: list[str], responses: list[str]) -> list[float]:
    tok_cfg = resolve_tokenizer(TokenizerConfig(), str(model))
    scorer = RewardScorer(RewardConfig(function=None, model=ModelSpec(path=str(model))), tok_cfg)
    tok = build_tokenizer(tok_cfg)
    return scorer.score(text_rollout(tok, prompts, responses, scorer.max_length)).tolist()


@pytest.mark.parametrize("normalize", ["auto", "model"])
def test_the_same_model_gives_the_same_shaped_scores_in_process_and_served(
    service, monkeypatch, normalize
):
    import torch

    from rlhf_ray.rewards.remote import RemoteReward
    from rlhf_ray.rewards.shaping import ScoreShaper

    url, model, cert, _ = service
    CA[:] = [cert]
    monkeypatch.setenv("RR_TOKEN", "sesame")
    remote = {"url": url, "token_env": "RR_TOKEN", "ca_bundle": cert}
    common = {"normalize": normalize, "missing_eos_penalty": 1.0, "function": None}
    local = ScoreShaper(RewardConfig(model=ModelSpec(path=str(model)), **common))
    served = ScoreShaper(RewardConfig(remote=remote, **common))
    assert served.mode == local.mode == ("running" if normalize == "auto" else "model")
    client = RemoteReward(served.reward.remote)
    for round_ in range(2):  # running statistics carry over from round to round
        prompts = [f"{p} {round_}" for p in PROMPTS]
        has_eos = torch.tensor([True, False, True])
        raw_local = torch.tensor(_local_scores(model, prompts, RESPONSES))
        raw_served = torch.tensor(client.score(prompts, RESPONSES)[0])
        shaped_local, shaped_served = local(raw_local, has_eos), served(raw_served, has_eos)
        assert shaped_served.tolist() == pytest.approx(shaped_local.tolist(), abs=1e-5)
    assert not torch.allclose(shaped_local, raw_local)  # shaping did something


def test_a_certificate_other_than_the_services_is_refused(service, monkeypatch):
    from rlhf_ray.config.rewards import RemoteRewardConfig
    from rlhf_ray.rewards.remote import RemoteRewardError, probe

    url, _, _, other = service
    monkeypatch.setenv("RR_TOKEN", "sesame")
    with pytest.raises(RemoteRewardError, match="CERTIFICATE_VERIFY_FAILED"):
        probe(RemoteRewardConfig(url=url, token_env="RR_TOKEN", ca_bundle=other))
