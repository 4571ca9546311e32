"""Train-set score statistics stored with a reward model, for ``reward.normalize``.

``rlhf-ray train-rm`` writes the mean and std of its final scores over the train pairs (chosen
and rejected sequences together) into the saved ``config.json`` as ``rlhf_ray_score_mean`` and
``rlhf_ray_score_std`` (CONTRACTS.md item 3). Plain ``transformers`` keeps unknown config keys,
so they survive ``from_pretrained``/``save_pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path

SCORE_MEAN_KEY = "rlhf_ray_score_mean"
SCORE_STD_KEY = "rlhf_ray_score_std"


def write_score_stats(directory: str | Path, mean: float, std: float) -> None:
    """Add the two statistics to ``directory/config.json`` (a saved model)."""
    path = Path(directory) / "config.json"
    config = json.loads(path.read_text())
    config[SCORE_MEAN_KEY], config[SCORE_STD_KEY] = float(mean), float(std)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_score_stats(path: str | Path) -> tuple[float, float] | None:
    """``(mean, std)`` stored with the reward model at ``path``, or None if it has none
    (a reward model trained elsewhere)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    mean = getattr(config, SCORE_MEAN_KEY, None)
    std = getattr(config, SCORE_STD_KEY, None)
    return None if mean is None or std is None else (float(mean), float(std))
