"""Open a tabular data source as a ``datasets.Dataset``, with row locations for error messages.

A source is ``"builtin"`` (the bundled prompts), ``"builtin:hh-rlhf"`` (300 bundled HH-RLHF
harmless-base pairs, MIT: see ``rlhf_ray/data/HH_RLHF_README.md``), a local file (.jsonl, .jsonl.gz, .json,
.json.gz, .parquet, .csv, .csv.gz), a directory written by ``Dataset.save_to_disk`` (or a
directory of such files), or else a Hugging Face Hub dataset id. Local files are read with the
``datasets`` packaged builders, which need no network.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    import datasets

__all__ = ["BUILTIN_HH_RLHF", "BUILTIN_PROMPTS", "RowLocator", "load_table"]

BUILTIN_PROMPTS = "builtin"
"""Source name of the prompts bundled with the package (``rlhf_ray/data/prompts.jsonl``)."""

BUILTIN_HH_RLHF = "builtin:hh-rlhf"
"""Source name of the bundled HH-RLHF sample (``rlhf_ray/data/hh_rlhf_sample.jsonl``)."""

_BUILTIN_FILES = {BUILTIN_PROMPTS: "prompts.jsonl", BUILTIN_HH_RLHF: "hh_rlhf_sample.jsonl"}

_BUILDERS = {
    ".jsonl": "json",
    ".jsonl.gz": "json",
    ".json": "json",
    ".json.gz": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".csv.gz": "csv",
}
_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass(frozen=True)
class RowLocator:
    """Names a row of a source the way a user finds it: file and 1-based line or row."""

    source: str
    json_lines: bool = False
    """True when rows are lines of a JSON-lines file (blank lines are skipped by the reader)."""

    def describe(self, index: int) -> str:
        """``"<source>, line N"`` for JSON-lines files, else ``"<source>, row N"`` (1-based)."""
        if self.json_lines:
            line = _nth_nonblank_line(self.source, index)
            if line is not None:
                return f"{self.source}, line {line}"
        return f"{self.source}, row {index + 1}"


def _suffix(path: str) -> str:
    name = path.lower()
    return next((s for s in sorted(_BUILDERS, key=len, reverse=True) if name.endswith(s)), "")


def _open_text(path: str) -> IO[str]:
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")  # noqa: SIM115 - the caller's `with` closes it


def _nth_nonblank_line(path: str, index: int) -> int | None:
    with _open_text(path) as fh:
        seen = -1
        for lineno, line in enumerate(fh, start=1):
            if line.strip():
                seen += 1
                if seen == index:
                    return lineno
    return None


def _first_bad_json_line(path: str) -> tuple[int, str] | None:
    try:
        with _open_text(path) as fh:
            for lineno, line in enumerate(fh, start=1):
                if line.strip():
                    try:
                        json.loads(line)
                    except json.JSONDecodeError as e:
                        return lineno, str(e)
    except (OSError, UnicodeDecodeError) as e:
        return 0, str(e)
    return None


def _load_builtin(name: str = BUILTIN_PROMPTS) -> tuple[datasets.Dataset, RowLocator]:
    import datasets

    filename = _BUILTIN_FILES[name]
    resource = resources.files("rlhf_ray.data").joinpath(filename)
    rows = [json.loads(line) for line in resource.read_text(encoding="utf-8").splitlines() if line]
    return datasets.Dataset.from_list(rows), RowLocator(
        f"rlhf_ray/data/{filename}", json_lines=False
    )


def _load_file(path: str) -> tuple[datasets.Dataset, RowLocator]:
    import datasets

    suffix = _suffix(path)
    builder = _BUILDERS[suffix]
    json_lines = suffix in (".jsonl", ".jsonl.gz")
    try:
        table = datasets.load_dataset(builder, data_files=path, split="train")
    except Exception as e:  # the builders raise many types; name the file in every case
        if builder == "json":
            bad = _first_bad_json_line(path) if json_lines else None
            if bad is not None:
                raise ValueError(f"{path}, line {bad[0]}: invalid JSON ({bad[1]})") from e
        raise ValueError(f"could not read {path} as {builder}: {type(e).__name__}: {e}") from e
    return table, RowLocator(path, json_lines=json_lines)


def _load_directory(path: str, split: str) -> tuple[datasets.Dataset, RowLocator]:
    import datasets

    if any((Path(path) / marker).exists() for marker in _SAVED_MARKERS):
        loaded = datasets.load_from_disk(path)
    else:
        loaded = datasets.load_dataset(path)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"{path}: no split {split!r} (splits: {sorted(loaded)})")
        loaded = loaded[split]
    return loaded, RowLocator(f"{path} [{split}]")


def _load_hub(source: str, split: str) -> tuple[datasets.Dataset, RowLocator]:
    import datasets

    try:
        table = datasets.load_dataset(source, split=split)
    except Exception as e:  # offline, unknown id, missing split, ...
        raise ValueError(
            f"{source!r} is not a local file or directory, and loading it as a Hugging Face Hub "
            f"dataset (split {split!r}) failed: {type(e).__name__}: {e}. Offline machines need a "
            f"local file ({', '.join(sorted(_BUILDERS))}) or a save_to_disk directory."
        ) from e
    return table, RowLocator(f"{source} [{split}]")


def load_table(source: str, split: str = "train") -> tuple[datasets.Dataset, RowLocator]:
    """Open ``source`` (see module docstring) as a Dataset plus a locator for error messages.

    ``split`` applies to Hub datasets and DatasetDict directories; a single file is one split.
    Raises FileNotFoundError for a path-like source that does not exist, ValueError otherwise.
    """
    if source in _BUILTIN_FILES:
        return _load_builtin(source)
    path = os.path.expanduser(source)
    looks_local = bool(_suffix(path)) or path.startswith(("/", ".", "~")) or os.path.exists(path)
    if os.path.isdir(path):
        return _load_directory(path, split)
    if os.path.isfile(path):
        if not _suffix(path):
            raise ValueError(
                f"{path}: unsupported file type (expected one of {', '.join(sorted(_BUILDERS))})"
            )
        return _load_file(path)
    if looks_local:
        raise FileNotFoundError(f"data file not found: {path}")
    return _load_hub(source, split)


def select_columns(
    table: datasets.Dataset, where: RowLocator, needed: list[str], hint: str
) -> dict[str, list]:
    """The ``needed`` columns of ``table`` as lists; a missing one raises ValueError naming the
    source, what is missing, the columns there are, and ``hint`` (what the user can set)."""
    columns = set(table.column_names)
    missing = [c for c in needed if c not in columns]
    if missing:
        raise ValueError(
            f"{where.source}: no field {missing[0]!r} (missing {missing}; columns: "
            f"{sorted(columns)}); {hint}"
        )
    return {c: table[c] for c in needed}
