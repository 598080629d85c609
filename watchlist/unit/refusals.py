"""What the unit's watchlist subscriber drops or refuses, and how often it says so.

Every message dropped is counted per reason (DROP_REASONS; the unit's heartbeat carries the
counts) and logged at WARNING at most once a minute per reason. A refused key set or announced
bundle is handed to the list's record (log, count, store) once per reason every
`record_interval_s`; the others are only counted, so a flood of bad key sets or announcements
costs no store write each.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from watchlist.format.errors import BundleRejected

log = logging.getLogger(__name__)

DROP_LOG_INTERVAL_S = 60.0
DROP_REASONS = ("keyset_oversized", "keyset_superseded", "bad_manifest", "bad_chunk")
"""What the subscriber drops: a key set over MAX_KEYSET_BYTES, a key set replaced by a newer one
before the worker took it, a manifest that does not parse (or names another slot), a chunk of the
wrong size or index."""


class Refusals:
    """The counts of messages dropped and refusals not recorded, for the subscriber on `prefix`.

    `record(exc, source)` writes a refusal to the list's record (Watchlist.record_rejection)."""

    def __init__(self, prefix: str, record: Callable[[BundleRejected, str], None], *, record_interval_s: float) -> None:
        self.prefix = prefix
        self._record = record
        self.record_interval_s = record_interval_s
        self._lock = threading.Lock()
        self._dropped = dict.fromkeys(DROP_REASONS, 0)
        self._logged: dict[str, float] = {}  # key -> when a warning under it was last logged
        self._recorded: dict[str, float] = {}  # rejection reason -> when it was last written to the store
        self._not_recorded = 0

    def counts(self) -> tuple[dict[str, int], int]:
        """Messages dropped per reason, and refusals counted but not recorded."""
        with self._lock:
            return dict(self._dropped), self._not_recorded

    def drop(self, reason: str, what: str) -> None:
        """Count a message dropped for `reason` (DROP_REASONS); WARNING at most once a minute per reason."""
        with self._lock:
            self._dropped[reason] += 1
            total = self._dropped[reason]
        self._warn_limited(reason, f"dropped {what} on {self.prefix}/# ({reason} so far: {total})")

    def reject(self, exc: BundleRejected, source: str) -> None:
        """Hand a refusal to the list's record once per reason every record_interval_s; count the others."""
        now = time.monotonic()
        last = self._recorded.get(exc.reason)
        if last is not None and now - last < self.record_interval_s:
            with self._lock:
                self._not_recorded += 1
                not_recorded = self._not_recorded
            self._warn_limited(
                "rejection",
                f"refused {source} ({exc.reason}): {exc.message}; {not_recorded} refusals counted "
                f"and not recorded so far (each reason is recorded once every {self.record_interval_s:g}s)",
            )
            return
        self._recorded[exc.reason] = now
        if self._not_recorded:
            exc = BundleRejected(exc.reason, f"{exc.message} ({self._not_recorded} refusals not recorded so far)")
        self._record(exc, source)

    def _warn_limited(self, key: str, message: str) -> None:
        """Log `message` at WARNING unless one under `key` was logged in the last minute."""
        now = time.monotonic()
        with self._lock:
            if now - self._logged.get(key, -DROP_LOG_INTERVAL_S) < DROP_LOG_INTERVAL_S:
                return
            self._logged[key] = now
        log.warning("watchlist: %s; logged at most once a minute", message)
