"""Loading a config schema: YAML, dotted ``key=value`` overrides, and validation errors as one
paragraph naming the field (``ConfigError``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from rlhf_ray.errors import UserError


class ConfigError(UserError, ValueError):
    """A config that cannot be used; the message names the field and says why."""


_Schema = TypeVar("_Schema", bound=BaseModel)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}`` (values parsed as YAML scalars)."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc})") from None
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}")
            node = child
        node[leaf] = value
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _describe(error: ValidationError, source: str) -> str:
    parts = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            parts.append(f"`{field}` is not a known setting")
        elif item["type"] == "value_error" or item["type"].startswith("assertion"):
            msg = str(item["msg"]).removeprefix("Value error, ")
            parts.append(f"`{field}`: {msg}" if field != "(top level)" else msg)
        else:
            parts.append(f"`{field}`: {item['msg'].lower()} (got {item.get('input')!r})")
    return f"Invalid config ({source}): " + "; ".join(parts) + "."


def load_schema(
    schema: type[_Schema], path: str | Path | None = None, overrides: list[str] | None = None
) -> _Schema:
    """``load_config`` for any config schema (the stage configs of ``stage_config`` use it)."""
    raw: dict[str, Any] = {}
    source = "embedded default"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"Cannot read config file {path}: {exc.strerror}.") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"Config file {path} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"Config file {path} must hold a mapping at the top level.")
    if overrides:
        raw = _merge(raw, parse_overrides(overrides))
        source += " + command-line overrides"
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


def to_yaml(cfg: BaseModel) -> str:
    """The resolved config as YAML (what every run dir and checkpoint records)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
