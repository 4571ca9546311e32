"""GGUF files as Hugging Face model directories, converted once into a cache.

transformers dequantizes a GGUF file (with the ``gguf`` package) into a model and a tokenizer,
but refuses to ``save_pretrained`` a model loaded that way ("quantized with gguf and is not
serializable"). So the architecture's class is built again from the loaded config without its
``quantization_config``, the dequantized weights are loaded into it strictly (every key must
match), and that model is saved with the file's tokenizer beside it.

The weights are saved in float32, the dtype transformers dequantizes to: a quantized weight
(``scale * q + min``, with float16 scale and min and a 4-8 bit q) is exact in float32 but not
always in bfloat16, and the runs that read the directory train in float32 by default. The cost is
disk: 4 bytes a parameter (0.54 GB for 135M parameters).

A converted directory is keyed by the file's sha256 (memoised by path, size and mtime, so an
unchanged file is not hashed again) and ``CONVERTER_VERSION``: a changed file converts again.
It is written to a temporary directory and renamed into place, so a directory in the cache is
always whole.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_ray.errors import UserError

CONVERTER_VERSION = 1
"""Part of every converted directory's name: bump it when what a conversion writes changes."""

SOURCE_FILE = "rlhf_ray_source.json"
"""Written into each converted directory: the file it came from, its sha256, how long it took."""

_PREFIX = "[rlhf_ray]"


def cache_root() -> Path:
    """``$RLHF_RAY_CACHE``, else ``~/.cache/rlhf_ray``."""
    return Path(os.environ.get("RLHF_RAY_CACHE") or "~/.cache/rlhf_ray").expanduser()


def say(message: str) -> None:
    """A progress line on the console (a conversion prints a few, never a bar)."""
    print(f"{_PREFIX} {message}", flush=True)


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF file's header says about the model in it."""

    architecture: str
    quantization: str
    """The file type (``general.file_type``, e.g. ``Q4_1``), else its commonest tensor type."""
    tensor_types: tuple[str, ...]
    """Every tensor type in the file, commonest first."""


def read_gguf_info(path: Path) -> GGUFInfo:
    """The architecture and quantization of the GGUF file at ``path`` (read with ``gguf``)."""
    from gguf import GGUFReader, LlamaFileType

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as exc:  # not a GGUF file, a truncated one
        raise UserError(f"{path}: not a readable GGUF file ({exc})") from None
    field = reader.fields.get("general.architecture")
    architecture = str(field.contents()) if field is not None else "unknown"
    types = Counter(t.tensor_type.name for t in reader.tensors)
    tensor_types = tuple(name for name, _ in types.most_common())
    file_type = reader.fields.get("general.file_type")
    quantization = tensor_types[0] if tensor_types else "none"
    # a file type this gguf does not know: the commonest tensor type names it
    with contextlib.suppress(ValueError):
        if file_type is not None:
            quantization = LlamaFileType(int(file_type.contents())).name.removeprefix("MOSTLY_")
    return GGUFInfo(architecture, quantization, tensor_types)


def _dequantizable(type_name: str) -> bool:
    """Whether ``gguf.dequantize`` implements the tensor type ``type_name`` (probed on one
    block of zeros: an unimplemented type raises before reading it)."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize

    qtype = GGMLQuantizationType[type_name]
    _, type_size = GGML_QUANT_SIZES[qtype]
    try:
        dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _architecture_supported(architecture: str) -> bool:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    # transformers renames a few llama.cpp names (qwen2moe -> qwen2_moe, gpt-oss -> gpt_oss)
    names = {architecture, architecture.replace("-", "_"), architecture.replace("moe", "_moe")}
    return any(name in GGUF_SUPPORTED_ARCHITECTURES for name in names)


def check_convertible(path: Path, info: GGUFInfo) -> None:
    """Refuse, naming the architecture and the quantization, a file that transformers cannot
    dequantize: an architecture it has no GGUF mapping for, or a tensor type ``gguf`` cannot
    dequantize."""
    import transformers

    what = f"{path.name} is a {info.architecture!r} model quantized as {info.quantization}"
    versions = f"transformers {transformers.__version__} with gguf"
    if not _architecture_supported(info.architecture):
        raise UserError(
            f"{what}: {versions} cannot load the architecture {info.architecture!r} from GGUF "
            "(supported: see transformers' GGUF documentation). Give a Hugging Face model "
            "directory or hub id as the model path instead."
        )
    missing = [t for t in info.tensor_types if not _dequantizable(t)]
    if missing:
        raise UserError(
            f"{what}: {versions} cannot dequantize its {', '.join(missing)} tensors. Use a file "
            "quantized otherwise (e.g. Q4_K_M, Q8_0, F16), or a Hugging Face model directory."
        )


def file_sha256(path: Path, cache: Path) -> str:
    """The sha256 of ``path``; memoised in ``cache/hashes`` by absolute path, size and mtime."""
    stat = path.stat()
    stamp = {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    memo = cache / "hashes" / (hashlib.sha256(stamp["path"].encode()).hexdigest()[:32] + ".json")
    try:
        saved = json.loads(memo.read_text())
        if {k: saved.get(k) for k in stamp} == stamp:
            return str(saved["sha256"])
    except (OSError, ValueError, KeyError):
        pass  # no memo yet, or a torn one: hash again
    sha = sha256_of(path)
    memo.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(memo, json.dumps({**stamp, "sha256": sha}))
    return sha


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def converted_dir(path: Path, cache: Path) -> Path:
    """Where the conversion of the GGUF file ``path`` lives in ``cache``."""
    sha = file_sha256(path, cache)
    return cache / "models" / f"{path.stem}-{sha[:16]}-v{CONVERTER_VERSION}"


def is_converted(directory: Path) -> bool:
    return (directory / SOURCE_FILE).is_file()


def gguf_model_dir(path: str | Path, cache: Path | None = None, out: Path | None = None) -> Path:
    """The Hugging Face directory of the GGUF file ``path``: from the cache, or converted now
    (into ``out`` if given, else the file's keyed directory in ``cache``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"model file not found: {path}")
    cache = cache or cache_root()
    target = out or converted_dir(path, cache)
    if is_converted(target):
        return target
    info = read_gguf_info(path)
    check_convertible(path, info)
    size_mb = path.stat().st_size / 1e6
    say(
        f"converting {path.name} ({info.architecture}, {info.quantization}, {size_mb:.0f} MB) "
        f"to a Hugging Face model directory, once (cached in {target.parent})"
    )
    started = time.perf_counter()
    record = {
        "source": str(path.resolve()),
        "sha256": file_sha256(path, cache),
        "architecture": info.architecture,
        "quantization": info.quantization,
        "converter_version": CONVERTER_VERSION,
    }
    convert_atomically(path, target, record)
    say(f"converted {path.name} in {time.perf_counter() - started:.0f} s: {target}")
    return target


def convert_atomically(path: Path, target: Path, record: dict[str, Any]) -> None:
    """Convert into a temporary directory beside ``target``, then rename it into place (a
    concurrent conversion that finished first wins; ours is dropped)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        started = time.perf_counter()
        dequantize_to(path, tmp)
        record = {**record, "seconds": round(time.perf_counter() - started, 1)}
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=1) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not is_converted(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def dequantize_to(path: Path, out: Path) -> None:
    """Load the GGUF file with transformers (dequantized, float32) and save the model and its
    tokenizer as a plain Hugging Face directory ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights

    folder, name = str(path.parent), path.name
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)  # what makes save_pretrained refuse
    config = type(loaded.config).from_dict(settings)
    with no_init_weights():  # every weight comes from the file just below
        model = type(loaded)(config)
    model.tie_weights()  # (skipped with the init) a tied output layer is saved once
    weights = loaded.state_dict()
    result = model.load_state_dict(weights, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise UserError(
            f"{path.name}: the dequantized weights do not fit {type(loaded).__name__} "
            f"(missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}); "
            "the file cannot be converted"
        )
    model.generation_config = loaded.generation_config
    with _quiet_transformers():
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' progress bars off while converting: its GGUF reader draws a plain tqdm
    bar over every tensor ("Converting and de-quantizing GGUF tensors"), which its own
    ``disable_progress_bar`` does not reach; ``say`` reports instead."""
    from unittest import mock

    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with mock.patch.object(gguf_utils, "tqdm", functools.partial(tqdm, disable=True)):
            yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
