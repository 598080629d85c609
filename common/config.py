"""The base of every config table: unknown keys are errors, so a typo never silently keeps a default."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A config table (a TOML table or a CLI's options): unknown keys are refused with their name."""

    model_config = ConfigDict(extra="forbid")
