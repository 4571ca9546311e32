"""Where a command writes: a fresh dated run directory."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path


def new_run_dir(root: str | Path = "runs", prefix: str = "ppo") -> Path:
    """A fresh dated directory ``root/prefix-DATE-TIME`` (never reuses an existing one)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        path = Path(root) / (f"{prefix}-{stamp}" + (f"-{n}" if n else ""))
        if not path.exists():
            return path
    raise RuntimeError(f"could not find a free run directory under {root}")
