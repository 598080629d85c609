"""The operators' store: hits and their crops, units, reviews, accounts, sessions and the audit chain.

One small interface, `HitStore`, with two implementations chosen by URL (`open_store`):
SQLite (`sqlite:///path` or a plain path; the default, embedded) and PostgreSQL
(`postgresql://...`, for a centre where several receivers and consoles share one database).
The SQL lives once, in the subset both speak, in the parts `HitStore` is made of, one job each:
`store_intake` (what receivers write), `store_sightings` (grouping hits, decisions under the
two-person rule of `central/review.py`), `store_reads`, `store_accounts`, `store_audit` and
`store_export`, all over `store_core` (transactions, the audit append). A backend only says how to
connect, how to run a transaction, and the few words that differ (`central/store_sqlite.py`,
`central/store_postgres.py`). The schema is versioned (`central/migrations.py`).

Everything here has a retention limit except the audit chain, which is the record of who did
what: `purge` removes hits, crops, context frames, reviews and rejects older than it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from central.store_accounts import AccountStore
from central.store_core import HitFilter, StoreError
from central.store_export import ExportStore
from central.store_intake import IntakeStore

__all__ = ["HitFilter", "HitStore", "StoreError", "open_store"]


def open_store(url: str | Path) -> HitStore:
    """The store at `url`: `postgresql://user@host:port/db`, `sqlite:///relative.sqlite`,
    `sqlite:////absolute.sqlite`, or a plain file path (SQLite)."""
    return _backend(url)(url)


def _backend(url: str | Path) -> type[HitStore]:
    text = str(url)
    if text.startswith(("postgresql://", "postgres://")):
        from central.store_postgres import PostgresHitStore

        return PostgresHitStore
    if "://" in text and not text.startswith("sqlite://"):
        raise StoreError(
            f"unknown store URL {text!r}: use sqlite:///path/to/hits.sqlite or postgresql://user@host:port/dbname"
        )
    from central.store_sqlite import SqliteHitStore

    return SqliteHitStore


class HitStore(IntakeStore, AccountStore, ExportStore):
    """Hits (each stored once, by id), crops, units, two-person reviews, accounts and the audit chain:
    the receivers' writes (`IntakeStore`), accounts and sessions (`AccountStore`), and through
    `ExportStore` the reads, the sightings with their decisions and the audit chain it exports.

    `HitStore(url)` opens the backend the URL names (see `open_store`). Safe to share between
    threads; several processes (receivers, consoles) may share one database.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> HitStore:
        if cls is HitStore:
            cls = _backend(args[0] if args else kwargs["url"])
        return super().__new__(cls)

    def purge(self, older_than_s: float, now: float | None = None, *, actor: str = "receiver") -> int:
        """Delete hits (with crops, context frames and reviews) and rejects received more than `older_than_s` ago,
        and expired sessions; returns hits deleted. The audit chain is kept, and a purge that
        deleted hits or rejects is entered in it as `actor`'s (the receiver's hourly retention by
        default), with how many of each and the cut-off."""
        now = time.time() if now is None else now
        cutoff = now - older_than_s
        old = "SELECT id FROM hits WHERE received_at < ?"
        with self._tx() as q:
            q(f"DELETE FROM crops WHERE hit_id IN ({old})", (cutoff,))
            q(f"DELETE FROM context_frames WHERE hit_id IN ({old})", (cutoff,))
            q(f"DELETE FROM reviews WHERE hit_id IN ({old})", (cutoff,))
            q("DELETE FROM hits WHERE received_at < ?", (cutoff,))
            n = q.rowcount
            # A sighting goes with its last hit; one that lost its best hit shows its best remaining one.
            q("DELETE FROM sightings WHERE NOT EXISTS (SELECT 1 FROM hits WHERE hits.sighting_id = sightings.id)")
            q(
                "UPDATE sightings SET best_hit_id = (SELECT id FROM hits WHERE hits.sighting_id = sightings.id "
                "ORDER BY score DESC, id LIMIT 1) WHERE NOT EXISTS (SELECT 1 FROM hits WHERE hits.id = sightings.best_hit_id)"
            )
            q("DELETE FROM rejects WHERE received_at < ?", (cutoff,))
            rejects = q.rowcount
            q("DELETE FROM sessions WHERE expires_at < ?", (now,))
            if n or rejects:
                detail = {"older_than_days": older_than_s / 86400, "cutoff": cutoff, "hits": n, "rejects": rejects}
                self._audit(q, actor, "purge", None, detail)
        return int(n)
