"""Requests to a running job, through its run dir: ``rlhf-ray scale RUN --rollout-workers N``.

The driver reads them between rounds. A file in the run dir works wherever the run dir is
reachable (the local disk, or the shared storage a cluster run writes to) and needs no
connection to the cluster.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rlhf_ray.errors import UserError

_FILE = "control.json"


def request_rollout_workers(run_dir: Path, num_workers: int) -> Path:
    """Ask the run in ``run_dir`` to resize its rollout pool before its next round."""
    if num_workers < 1:
        raise UserError(f"--rollout-workers must be at least 1 (got {num_workers})")
    if not (run_dir / "config.yaml").exists():
        raise UserError(f"{run_dir} is not a run dir (no config.yaml): is the run started?")
    path = run_dir / _FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rollout_workers": num_workers}))
    os.replace(tmp, path)  # atomic: the driver never reads half a request
    return path


def requested_rollout_workers(run_dir: Path, default: int) -> int:
    """The pool size last requested for ``run_dir``, else ``default``."""
    try:
        return int(json.loads((run_dir / _FILE).read_text())["rollout_workers"])
    except (FileNotFoundError, KeyError, ValueError):
        return default
