"""Bad input fails on the driver before any actor starts: ``rlhf-ray ppo`` exits 2 with one
paragraph naming the file, line and field, and never connects to Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import rlhf_ray.distributed
from rlhf_ray import cli
from rlhf_ray.config.ppo import load_config, to_yaml
from rlhf_ray.ppo.checkpoint import CHECKPOINT_PARTS

SMALL = ["train.rounds=1", "rollout.batch_size=4", "ppo.minibatch_size=2"]


def _write(path, lines: list[bytes]) -> str:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return str(path)


def _fake_checkpoint(run_dir, parts, cfg) -> None:
    ckpt = run_dir / "checkpoints" / "round_000001"
    ckpt.mkdir(parents=True)
    for part in parts:
        if part.endswith((".json", ".yaml")):
            (ckpt / part).write_text(to_yaml(cfg) if part == "config.yaml" else json.dumps({}))
        else:
            (ckpt / part).mkdir()
            (ckpt / part / "state").mkdir()


@pytest.fixture
def no_ray(monkeypatch, tmp_path):
    """``rlhf-ray ppo`` in this process, in ``tmp_path``; connecting to Ray fails the test."""

    def connect(*args, **kwargs):
        raise AssertionError("preflight let a bad input through to Ray")

    monkeypatch.setattr(rlhf_ray.distributed, "connect", connect)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _fails(capsys, *args: str) -> str:
    assert cli.main(["ppo", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlhf-ray:") and "Traceback" not in err
    return err


CASES = {
    "empty JSONL": ([b""], ["data.prompts", "prompts.jsonl", "empty"]),
    "non-UTF-8": ([b'{"prompt": "ok"}', b'{"prompt": "caf\xe9"}'], ["prompts.jsonl, line 2", "UTF-8"]),
    "not JSON": ([b'{"prompt": "ok"}', b"", b'{"prompt": '], ["prompts.jsonl, line 3", "invalid JSON"]),
    "field missing everywhere": ([b'{"text": "hi"}'], ["prompts.jsonl", "no field 'prompt'", "text"]),
    "field missing in a row": ([b'{"prompt": "a"}', b'{"prompt": "b"}', b'{"other": 1}'],
                               ["prompts.jsonl, line 3", "'prompt' is missing"]),
    "field empty": ([b'{"prompt": "a"}', b'{"prompt": "  "}'], ["prompts.jsonl, line 2", "'prompt'"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_bad_prompt_files_are_named_with_line_and_field(no_ray, capsys, case):
    lines, names = CASES[case]
    path = _write(no_ray / "prompts.jsonl", lines)
    err = _fails(capsys, *SMALL, f"data.prompts={path}")
    for name in names:
        assert name in err


def test_bad_rows_are_skipped_and_counted_when_asked(no_ray):
    from rlhf_ray.data.tokenization import build_tokenizer
    from rlhf_ray.ppo.loop import build_prompts

    path = _write(no_ray / "prompts.jsonl",
                  [b'{"prompt": "a"}', b"{oops", b'{"prompt": "caf\xe9"}', b'{"other": 1}',
                   b"[1, 2]", b'{"prompt": "b"}'])  # fmt: skip
    cfg = load_config(None, [f"data.prompts={path}", "data.on_bad_row=skip"])
    prompts = build_prompts(cfg, build_tokenizer(cfg.tokenizer))
    assert list(prompts) == ["a", "b"]
    assert [s.split(":")[0] for s in prompts.skipped] == [f"{path}, line {n}" for n in (2, 3, 5, 4)]


def test_a_typo_in_a_path_is_refused(no_ray, capsys):
    err = _fails(capsys, f"data.prompts={no_ray}/promts.jsonl")
    assert "promts.jsonl" in err and "not found" in err


@pytest.mark.parametrize(
    "source, function, names",
    [
        ("def score(prompts, responses)\n", "badmod:score", ["badmod", "SyntaxError"]),
        ("import no_such_package\n", "badmod:score", ["badmod", "no_such_package"]),
        ("x = 1\n", "badmod:score", ["badmod", "'score'"]),
        ("def score(responses):\n    return []\n", "badmod:score", ["fn(prompts, responses)"]),
    ],
)
def test_a_bad_reward_module_is_refused(no_ray, capsys, source, function, names):
    (no_ray / "badmod.py").write_text(source)
    sys.modules.pop("badmod", None)
    err = _fails(capsys, *SMALL, f"reward.function={function}")
    for name in names:
        assert name in err


@pytest.mark.parametrize(
    "override, names",
    [
        ("policy.model.path=/no/such/model", ["policy.model.path", "/no/such/model"]),
        ("reference.model.path=./no-ref", ["reference.model.path", "no-ref"]),
        ("tokenizer.kind=hf", None),
    ],
)
def test_missing_model_and_tokenizer_paths_are_refused(no_ray, capsys, override, names):
    if override == "tokenizer.kind=hf":
        err = _fails(capsys, *SMALL, override, f"tokenizer.name_or_path={no_ray}/tok")
        assert "tokenizer" in err and "tok" in err
        return
    err = _fails(capsys, *SMALL, override)
    for name in names:
        assert name in err
    (no_ray / "empty-model").mkdir()
    key = override.split("=")[0]
    assert "config.json" in _fails(capsys, *SMALL, f"{key}={no_ray}/empty-model")


def test_an_incomplete_or_incompatible_checkpoint_is_refused(no_ray, capsys):
    cfg = load_config(None, SMALL)
    run = no_ray / "run"
    _fake_checkpoint(run, [p for p in CHECKPOINT_PARTS if p != "value_state"], cfg)
    err = _fails(capsys, *SMALL, "--run-dir", str(run), "--resume")
    assert "round_000001" in err and "incomplete" in err and "value_state" in err

    # the default value group (one float32 rank) trains with the torch engine: its files
    value = run / "checkpoints" / "round_000001" / "value_state"
    value.mkdir()
    for name in ("torch_engine.safetensors", "torch_engine.json"):
        (value / name).write_text("")
    err = _fails(capsys, *SMALL, "ppo.clip_eps=0.3", "--run-dir", str(run), "--resume")
    assert "ppo.clip_eps" in err


def test_the_command_exits_within_seconds_without_a_traceback(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf_ray.cli", "ppo", f"data.prompts={tmp_path}/typo.jsonl"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "typo.jsonl" in proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing started, nothing written


@pytest.mark.parametrize("command", ["sft", "train-rm"])
def test_stages_check_their_data_and_model_before_ray(no_ray, capsys, command):
    bad = _write(no_ray / "pairs.jsonl", [b'{"chosen": "a", "rejected": "b"}', b"{oops"])
    assert "pairs.jsonl, line 2" in _fails_as(capsys, command, f"data.path={bad}")
    assert "model.path" in _fails_as(capsys, command, "model.path=/no/such/model")


def _fails_as(capsys, command: str, *args: str) -> str:
    assert cli.main([command, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlhf-ray:") and "Traceback" not in err
    return err


def test_sequences_longer_than_a_models_positions_are_refused(no_ray, capsys):
    from rlhf_ray.data.tokenization import build_tokenizer
    from tests.helpers.model_dirs import save_policy

    # the default preset covers 256 positions; 48 prompt tokens + 300 new ones do not fit
    err = _fails(capsys, *SMALL, "rollout.max_new_tokens=300")
    for name in ["policy.model", "256 positions", "348", "rollout.max_new_tokens", "max_positions"]:
        assert name in err
    assert _fails(capsys, *SMALL, "value.model.max_positions=32").count("value.model") == 2
    # a model directory: its config's positions count
    tok = build_tokenizer(load_config(None, []).tokenizer)
    ref = save_policy(no_ray / "ref", tok)
    capsys.readouterr()  # the save's progress bar
    positions = json.loads((ref / "config.json").read_text())["n_positions"]
    new_tokens = positions - 48 + 1
    longer = f"policy.model.max_positions={positions * 2}"
    assert (
        _fails(capsys, *SMALL, longer, f"rollout.max_new_tokens={new_tokens}").count("value") == 2
    )
    err = _fails(
        capsys,
        *SMALL,
        longer,
        f"value.model.max_positions={positions * 2}",
        f"reference.model.path={ref}",
        f"rollout.max_new_tokens={new_tokens}",
    )
    assert f"reference.model covers {positions} positions" in err and "max_positions" not in err
    # eval samples both policies the same way
    args = ["--policy", str(ref), "--baseline", str(ref), f"rollout.max_new_tokens={new_tokens}"]
    assert f"policy covers {positions} positions" in _fails_as(capsys, "eval", *args)
