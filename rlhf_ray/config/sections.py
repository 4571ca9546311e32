"""The base of every config section (``config.py``, ``reward_config.py``, ``stage_config.py``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section: frozen, unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")
