"""``[watchlist]`` in the unit config: where the unit keeps its watchlist and whom it trusts for it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from common.config import StrictModel

DEFAULT_MAX_BUNDLE_BYTES = 512 * 1024 * 1024


class WatchlistConfig(StrictModel):
    """The unit side of the signed watchlist.

    Example (unit TOML)::

        [watchlist]
        root_key = "hq-root.pub"          # HQ's root public key, pinned at installation
        store = "/var/lib/checkpoint/watchlist.db"
        topic = "checkpoint/v1/station-12/watchlist"
        on_expired = "warn"
    """

    root_key: Path = Field(
        description="HQ's root public key (PEM or 64 hex digits), pinned at installation; every bundle must chain to it"
    )
    store: Path = Field(
        Path("/var/lib/checkpoint/watchlist.db"),
        description="SQLite file holding the applied watchlist (created on first use)",
    )
    topic: str | None = Field(
        None,
        description="MQTT topic prefix HQ publishes this site's watchlist under (e.g. checkpoint/v1/<site>/watchlist); "
        "unset: no live updates, bundles arrive as files (`edge watchlist apply`)",
    )
    on_expired: Literal["warn", "stop"] = Field(
        "warn",
        description="when the applied list is past its expiry: 'warn' keeps matching and reports it, "
        "'stop' matches nothing until a fresh bundle arrives",
    )
    max_bundle_bytes: int = Field(
        DEFAULT_MAX_BUNDLE_BYTES,
        ge=4096,
        le=8 * 1024**3,
        description="largest bundle accepted, checked before anything is parsed",
    )

    @field_validator("topic")
    @classmethod
    def _topic(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v or v.startswith("/") or v.endswith("/") or any(c in v for c in "#+\x00"):
            raise ValueError(
                f"topic {v!r} must be a plain MQTT topic prefix such as 'checkpoint/site-1/watchlist' "
                "(no wildcards, no leading or trailing '/')"
            )
        return v
