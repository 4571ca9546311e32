"""Open a tabular data source as a ``datasets.Dataset``, with row locations for error messages.

A source is ``"builtin"`` (the bundled prompts), ``"builtin:hh-rlhf"`` (300 bundled HH-RLHF
harmless-base pairs, MIT: see ``rlhf_ray/data/HH_RLHF_README.md``), ``"builtin:arithmetic"`` /
``"builtin:arithmetic-heldout"`` (generated sums with a ``label``: ``rlhf_ray/data/arithmetic.py``), a local file (.jsonl, .jsonl.gz, .json,
.json.gz, .parquet, .csv, .csv.gz), a directory written by ``Dataset.save_to_disk`` (or a
directory of such files), or else a Hugging Face Hub dataset id. Local files are read with the
``datasets`` packaged builders, which need no network.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO, TYPE_CHECKING, TypeAlias, TypeVar

if TYPE_CHECKING:
    import datasets

T = TypeVar("T")
logger = logging.getLogger(__name__)

__all__ = [
    "BUILTIN_ARITHMETIC",
    "BUILTIN_ARITHMETIC_HELDOUT",
    "BUILTIN_HH_RLHF",
    "BUILTIN_PROMPTS",
    "HELDOUT_SPLITS",
    "JsonRows",
    "RowLocator",
    "load_table",
    "read_json_lines",
]

BUILTIN_PROMPTS = "builtin"
"""Source name of the prompts bundled with the package (``rlhf_ray/data/prompts.jsonl``)."""

BUILTIN_HH_RLHF = "builtin:hh-rlhf"
"""Source name of the bundled HH-RLHF sample (``rlhf_ray/data/hh_rlhf_sample.jsonl``)."""

_BUILTIN_FILES = {BUILTIN_PROMPTS: "prompts.jsonl", BUILTIN_HH_RLHF: "hh_rlhf_sample.jsonl"}

BUILTIN_ARITHMETIC = "builtin:arithmetic"
"""Generated sums A + B, A and B in 0..20, with a ``label``: the training split."""
BUILTIN_ARITHMETIC_HELDOUT = "builtin:arithmetic-heldout"
"""The held-out split of the same sums, disjoint from the training split."""

HELDOUT_SPLITS = {BUILTIN_ARITHMETIC: BUILTIN_ARITHMETIC_HELDOUT}
"""A built-in training set -> its held-out split (what eval uses by default after training on
it: ``stages/evaluate.py``)."""

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
    lines: tuple[int, ...] | None = None
    """The line of each row, when rows were read line by line (some lines skipped)."""
    skipped: tuple[str, ...] = ()
    """``"<source>, line N: problem"`` for each unreadable line that was skipped."""

    def describe(self, index: int) -> str:
        """``"<source>, line N"`` for JSON-lines files, else ``"<source>, row N"`` (1-based)."""
        if self.lines is not None and index < len(self.lines):
            return f"{self.source}, line {self.lines[index]}"
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


class JsonRows:
    """Rows of a JSON-lines file read line by line (the fallback when the ``datasets`` reader
    fails): just what the loaders use of a ``datasets.Dataset``. Values keep their JSON types."""

    def __init__(self, rows: list[dict]):
        self.rows = rows
        self.column_names = sorted({key for row in rows for key in row})
        self.num_rows = len(rows)

    def __getitem__(self, column: str) -> list:
        return [row.get(column) for row in self.rows]


Table: TypeAlias = "datasets.Dataset | JsonRows"
"""What ``load_table`` returns: a Dataset, or rows read line by line."""


def read_json_lines(path: str) -> tuple[list[dict], list[int], list[str]]:
    """Every non-blank line of a (gzipped) JSON-lines file: the rows that are JSON objects, the
    line of each, and ``"<path>, line N: problem"`` for each line that is not valid UTF-8,
    not JSON or not an object."""
    opener = gzip.open if path.endswith(".gz") else open
    rows: list[dict] = []
    lines: list[int] = []
    bad: list[str] = []
    with opener(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad.append(f"{path}, line {lineno}: not valid UTF-8 (byte {e.start + 1})")
                continue
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except (json.JSONDecodeError, RecursionError) as e:
                bad.append(f"{path}, line {lineno}: invalid JSON ({e})")
                continue
            if not isinstance(row, dict):
                bad.append(f"{path}, line {lineno}: a JSON {type(row).__name__}, not an object")
                continue
            rows.append(row)
            lines.append(lineno)
    return rows, lines, bad


def _load_json_lines(path: str, skip_bad_lines: bool) -> tuple[JsonRows, RowLocator]:
    try:
        rows, lines, bad = read_json_lines(path)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise ValueError(f"could not read {path}: {type(e).__name__}: {e}") from e
    if bad and not skip_bad_lines:
        more = f" (and {len(bad) - 1} more bad lines)" if len(bad) > 1 else ""
        raise ValueError(bad[0] + more)
    return JsonRows(rows), RowLocator(path, json_lines=True, lines=tuple(lines), skipped=tuple(bad))


def _load_builtin(name: str = BUILTIN_PROMPTS) -> tuple[datasets.Dataset, RowLocator]:
    import datasets

    filename = _BUILTIN_FILES[name]
    resource = resources.files("rlhf_ray.data").joinpath(filename)
    rows = [json.loads(line) for line in resource.read_text(encoding="utf-8").splitlines() if line]
    return datasets.Dataset.from_list(rows), RowLocator(
        f"rlhf_ray/data/{filename}", json_lines=False
    )


def _load_file(path: str, skip_bad_lines: bool = False) -> tuple[Table, RowLocator]:
    import datasets

    suffix = _suffix(path)
    builder = _BUILDERS[suffix]
    if suffix in (".jsonl", ".jsonl.gz"):
        # checked line by line first: the arrow reader accepts some invalid UTF-8 silently and
        # names no line when it fails
        rows, where = _load_json_lines(path, skip_bad_lines)
        if where.skipped:
            return rows, where
    quiet = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()  # a bar per file read is noise on the console
    try:
        table = datasets.load_dataset(builder, data_files=path, split="train")
    except Exception as e:  # the builders raise many types; name the file in every case
        if builder == "json" and suffix.startswith(".jsonl"):
            return rows, where  # valid JSON objects the arrow reader cannot type: keep them
        raise ValueError(f"could not read {path} as {builder}: {type(e).__name__}: {e}") from e
    finally:
        if not quiet:
            datasets.utils.enable_progress_bars()
    return table, RowLocator(path, json_lines=builder == "json" and suffix.startswith(".jsonl"))


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


def load_table(
    source: str, split: str = "train", skip_bad_lines: bool = False
) -> tuple[Table, RowLocator]:
    """Open ``source`` (see module docstring) as a Dataset plus a locator for error messages.

    ``split`` applies to Hub datasets and DatasetDict directories; a single file is one split.
    A JSON-lines line that is not UTF-8, JSON or an object raises ValueError naming file and
    line, or with ``skip_bad_lines`` is dropped and listed in ``RowLocator.skipped``.
    Raises FileNotFoundError for a path-like source that does not exist, ValueError otherwise
    (also for a source without rows).
    """
    table, where = _open(source, split, skip_bad_lines)
    if table.num_rows == 0:
        skipped = f" ({len(where.skipped)} unreadable lines skipped)" if where.skipped else ""
        raise ValueError(f"{where.source}: no rows, the data is empty{skipped}")
    return table, where


def _load_generated(name: str) -> tuple[datasets.Dataset, RowLocator]:
    import datasets

    from rlhf_ray.data.arithmetic import arithmetic_rows

    rows = arithmetic_rows(heldout=name == BUILTIN_ARITHMETIC_HELDOUT)
    return datasets.Dataset.from_list(rows), RowLocator(name)


def _open(source: str, split: str, skip_bad_lines: bool) -> tuple[Table, RowLocator]:
    if source in _BUILTIN_FILES:
        return _load_builtin(source)
    if source in (BUILTIN_ARITHMETIC, BUILTIN_ARITHMETIC_HELDOUT):
        return _load_generated(source)
    if source.startswith("builtin:"):
        known = [*_BUILTIN_FILES, BUILTIN_ARITHMETIC, BUILTIN_ARITHMETIC_HELDOUT]
        raise ValueError(f"unknown built-in data set {source!r}; the built-in ones: {known}")
    path = os.path.expanduser(source)
    looks_local = bool(_suffix(path)) or path.startswith(("/", ".", "~")) or os.path.exists(path)
    if os.path.isdir(path):
        return _load_directory(path, split)
    if os.path.isfile(path):
        if not _suffix(path):
            raise ValueError(
                f"{path}: unsupported file type (expected one of {', '.join(sorted(_BUILDERS))})"
            )
        return _load_file(path, skip_bad_lines)
    if looks_local:
        raise FileNotFoundError(f"data file not found: {path}")
    return _load_hub(source, split)


def select_columns(
    table: Table, where: RowLocator, needed: list[str], hint: str
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


def parse_rows(
    num_rows: int,
    parse: Callable[[int], T],
    where: RowLocator,
    skip_bad_rows: bool,
    kind: tuple[str, str],
) -> tuple[list[T], int]:
    """``parse(i)`` for every row, as ``(items, num_skipped)``. A row whose ``parse`` raises
    ValueError raises again naming the file and line, or with ``skip_bad_rows`` is counted (the
    first one logged). ``kind``: the row's and the items' names in messages, e.g. ``("SFT",
    "SFT examples")``. No usable row at all raises."""
    items: list[T] = []
    skipped = 0
    for i in range(num_rows):
        try:
            items.append(parse(i))
        except ValueError as e:
            message = f"{where.describe(i)}: {e}"
            if not skip_bad_rows:
                raise ValueError(message) from None
            if skipped == 0:
                logger.warning("skipping bad %s row: %s", kind[0], message)
            skipped += 1
    if not items:
        raise ValueError(f"{where.source}: no usable {kind[1]} ({skipped} rows skipped)")
    return items, skipped
