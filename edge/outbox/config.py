"""[outbox]: where unsent hits wait, how much room they may take, and whether sent hits wait for the
centre's verdict."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from common.config import StrictModel

MIN_MAX_BYTES = 64 * 1024


class OutboxConfig(StrictModel):
    """[outbox]: where unsent hits wait and how much room they may take."""

    path: Path = Field(
        default=Path("/var/lib/checkpoint/outbox.sqlite"),
        description="SQLite file for hits not yet acknowledged by the broker (its directory is created)",
    )
    max_bytes: int = Field(
        default=512 * 1024 * 1024,
        ge=MIN_MAX_BYTES,
        description="room for pending hit data (records + crops); when full, oldest crops go first, records last",
    )
    max_crop_bytes: int = Field(
        default=256 * 1024,
        ge=0,
        description="a face crop larger than this is dropped from its hit at once (and counted)",
    )

    verdicts: Literal["auto", "require", "off"] = Field(
        default="auto",
        description="keep a sent hit until the centre's verdict: auto (until a verdict ever came, delete "
        "verdict_timeout_s after the broker's PUBACK, for receivers older than verdicts), require, or off "
        "(delete on PUBACK)",
    )
    verdict_timeout_s: float = Field(
        default=300.0,
        ge=0.05,
        le=86400,
        description="a hit without a verdict this long after the broker's PUBACK is sent again (the wait "
        "doubles with each resend, up to 16 times this); the receiver answers a hit it holds 'duplicate'",
    )
    quarantine_max: int = Field(
        default=1000,
        ge=0,
        description="hits the centre refused kept with their reason; beyond this the oldest go (counted)",
    )

    @model_validator(mode="after")
    def _crop_fits(self) -> OutboxConfig:
        if self.max_crop_bytes > self.max_bytes // 4:
            raise ValueError(
                f"max_crop_bytes ({self.max_crop_bytes}) must be at most a quarter of max_bytes "
                f"({self.max_bytes}) so one crop cannot push the whole outbox out; raise max_bytes or lower it"
            )
        return self
