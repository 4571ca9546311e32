"""Helpers shared by the benchmark scripts: a private local Ray, tables, a noise banner.

Not a benchmark itself. The scripts run as ``python benchmarks/X.py`` so this directory is on
``sys.path`` and ``import _common`` works.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

NOISE_NOTE = (
    "NOTE: timings on a small, possibly loaded machine (here {cpus} cores, load average {load}) "
    "are noisy; compare figures taken in the same run, and repeat before drawing conclusions."
)


def banner(title: str) -> None:
    try:
        load = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        load = "n/a"
    import torch

    print(f"== {title}")
    print(
        f"   python {platform.python_version()}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPU cores"
    )
    print("   " + NOISE_NOTE.format(cpus=os.cpu_count(), load=load))
    print(flush=True)


@contextmanager
def local_ray(num_cpus: int = 2, namespace: str | None = None) -> Iterator[float]:
    """A private local Ray on a short temp dir; yields the seconds ``ray.init`` took.

    Always shut down (and the temp dir removed) on exit, whatever happened inside.
    """
    import ray

    temp_dir = tempfile.mkdtemp(prefix="rb-", dir="/tmp")  # socket paths must stay short
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    start = time.perf_counter()
    try:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            _temp_dir=temp_dir,
            namespace=namespace,
            logging_level="WARNING",
            log_to_driver=False,
        )
        yield time.perf_counter() - start
    finally:
        ray.shutdown()
        time.sleep(1.0)  # let the raylet and workers exit before the dir goes
        shutil.rmtree(temp_dir, ignore_errors=True)


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def mean(xs: Sequence[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain fixed-width table (first column left-aligned, the rest right-aligned)."""

    def fmt(v: object) -> str:
        if isinstance(v, float):
            if v != v:  # nan
                return "-"
            return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.1f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(items: Sequence[str]) -> str:
        return "  ".join(
            s.ljust(w) if i == 0 else s.rjust(w)
            for i, (s, w) in enumerate(zip(items, widths, strict=True))
        )

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)
