"""Property-based: malformed configs and data rows end in a clear error or a counted skip, never
an unhandled exception or a hang."""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf_ray.config.ppo import Config, ConfigError, load_config
from rlhf_ray.data.prompts import load_prompt_set
from rlhf_ray.errors import UserError

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
)  # fmt: skip
SECTIONS = list(Config.model_fields)
KEYS = [f"{s}.{k}" for s in SECTIONS for k in getattr(Config.model_fields[s].annotation,
                                                      "model_fields", {})]  # fmt: skip
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)  # fmt: skip


def _loads_or_config_error(*args) -> None:
    try:
        cfg = load_config(*args)
    except ConfigError as exc:
        assert str(exc).strip()
        return
    assert isinstance(cfg, Config)


@FAST
@given(st.lists(st.tuples(st.sampled_from(KEYS) | st.text(max_size=15), values), max_size=4))
def test_any_override_is_a_config_or_a_config_error(pairs):
    _loads_or_config_error(None, [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}"
                                  if not isinstance(v, str) else f"{k}={v}" for k, v in pairs])  # fmt: skip


@FAST
@given(st.text(alphabet=string.printable, max_size=200) | st.dictionaries(
    st.sampled_from(SECTIONS) | st.text(max_size=8),
    st.dictionaries(st.text(max_size=10), values, max_size=3) | values, max_size=4,
).map(lambda tree: yaml.safe_dump(tree)))  # fmt: skip
def test_any_config_file_is_a_config_or_a_config_error(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.yaml"
        path.write_text(text)
        _loads_or_config_error(path)


json_rows = st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "x"]), values,
                            max_size=3).map(lambda r: json.dumps(r).encode())  # fmt: skip
lines = st.lists(json_rows | st.binary(max_size=20) | st.just(b"") | st.just(b'{"prompt": "hi"}'),
                 max_size=8)  # fmt: skip


@SLOW
@given(lines, st.sampled_from(["error", "skip"]), st.sampled_from(["auto", "plain", "hh"]))
def test_any_prompt_file_loads_fails_clearly_or_counts_its_skips(rows, on_bad_row, fmt):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prompts.jsonl"
        path.write_bytes(b"\n".join(r.replace(b"\n", b" ") for r in rows) + b"\n")
        try:
            loaded = load_prompt_set(str(path), fmt=fmt, on_bad_row=on_bad_row)
        except (ValueError, UserError) as exc:
            assert str(path) in str(exc)  # names the file
            return
        assert loaded.conversations
        if on_bad_row == "error":
            assert loaded.skipped == []
        else:
            nonblank = sum(bool(r.replace(b"\n", b" ").strip()) for r in rows)
            assert len(loaded.conversations) + len(loaded.skipped) == nonblank
            assert all(s.startswith(f"{path}, line ") for s in loaded.skipped)
