"""What every part of the hit store stands on: the backend's contract (connect, transaction, one read,
the audit lock), the transaction and read helpers, the audit chain's append, `StoreError`, `Runner`
and `HitFilter`. The parts of `central.store.HitStore` (intake, sightings, reads, accounts, the audit
chain, exports) each extend `StoreCore`; `central/store_sqlite.py` and `central/store_postgres.py`
fill in the contract.
"""

from __future__ import annotations

import abc
import contextlib
import json
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from central import audit as audit_chain
from central.migrations import migrate

MAX_REJECTS = 10_000
"""The rejects table keeps the newest this many rows (and none older than the hit retention)."""

_T = TypeVar("_T")


class StoreError(RuntimeError):
    """The store cannot be opened, or was asked for something it does not hold or allow."""


@dataclass(frozen=True)
class HitFilter:
    """What the hit list is narrowed to; None means any."""

    review_state: str | None = None
    person_id: str | None = None
    site: str | None = None
    unit_id: str | None = None
    camera_id: str | None = None
    since: float | None = None
    until: float | None = None

    def where(self) -> tuple[str, list[Any]]:
        clauses, args = [], []
        for column in ("review_state", "person_id", "site", "unit_id", "camera_id"):
            value = getattr(self, column)
            if value is not None:
                clauses.append(f"{column} = ?")
                args.append(value)
        if self.since is not None:
            clauses.append("received_at >= ?")
            args.append(self.since)
        if self.until is not None:
            clauses.append("received_at < ?")
            args.append(self.until)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


class Runner(abc.ABC):
    """Runs statements inside one transaction: `q(sql, args)` returns the rows as dicts (none for
    writes) and leaves the count of rows written in `q.rowcount`."""

    rowcount = -1

    @abc.abstractmethod
    def __call__(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]: ...


class StoreCore(abc.ABC):
    """The store's connection, its transactions and the audit chain's append, over a backend.

    Safe to share between threads; several processes (receivers, consoles) may share one database.
    """

    #: SQL words that differ between backends.
    greatest = "max"
    for_update = ""
    #: Rows the rejects table keeps (the newest).
    max_rejects = MAX_REJECTS

    def __init__(self, url: str | Path) -> None:
        self.location = str(url)
        self._lock = threading.RLock()
        self._connect()
        with self._tx() as q:
            self._lock_audit(q)
            self.schema_version = migrate(q, self.dialect)

    # --- what a backend provides ------------------------------------------------------------

    dialect: str = ""

    @abc.abstractmethod
    def _connect(self) -> None:
        """Open the connection (raise StoreError naming the location when it cannot)."""

    @abc.abstractmethod
    def _transaction(self) -> contextlib.AbstractContextManager[Runner]:
        """A transaction that holds the database's write lock."""

    @abc.abstractmethod
    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Run one read outside a transaction; rows as dicts."""

    @abc.abstractmethod
    def _lock_audit(self, q: Runner) -> None:
        """Serialise appends to the audit chain (and migrations) across processes."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close the connection."""

    # --- helpers ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Runner]:
        with self._lock, self._transaction() as q:
            yield q

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            return self._query(sql, args)

    def _audit(self, q: Runner, actor: str, action: str, subject: str | None, detail: dict) -> None:
        self._lock_audit(q)
        last = q("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
        seq = int(last[0]["seq"]) + 1 if last else 1
        prev = last[0]["hash"] if last else audit_chain.GENESIS
        entry = audit_chain.make_entry(seq, time.time(), actor, action, subject, detail, prev)
        q(
            "INSERT INTO audit(seq, at, actor, action, subject, detail, prev_hash, hash) VALUES (?,?,?,?,?,?,?,?)",
            [entry[c] for c in audit_chain.COLUMNS],
        )

    @staticmethod
    def _hit_row(row: dict[str, Any]) -> dict[str, Any]:
        row = dict(row)
        row["box"] = json.loads(row["box"]) if row.get("box") else None
        row["has_crop"] = bool(row.get("has_crop"))
        row["has_context"] = bool(row.get("has_context"))
        return row


def chunks(seq: list[_T], size: int) -> Iterator[list[_T]]:
    """`seq` in consecutive pieces of at most `size` (one multi-row statement each)."""
    for i in range(0, len(seq), size):
        yield seq[i : i + size]
