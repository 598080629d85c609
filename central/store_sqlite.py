"""The SQLite hit store: one file, WAL mode, so consoles read while receivers write."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from central.store import HitStore
from central.store_core import Runner, StoreError


def sqlite_path(url: str | Path) -> Path:
    """The file a `sqlite:///relative` / `sqlite:////absolute` URL or a plain path names."""
    text = str(url)
    if text.startswith("sqlite://"):
        rest = text[len("sqlite://") :]
        if not rest.startswith("/") or rest == "/":
            raise StoreError(f"store URL {text!r}: write sqlite:///relative/path or sqlite:////absolute/path")
        return Path(rest[1:])
    return Path(text)


class _SqliteRunner(Runner):
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __call__(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cur = self.conn.execute(sql, tuple(args))
        self.rowcount = cur.rowcount
        return [dict(r) for r in cur.fetchall()] if cur.description else []


class SqliteHitStore(HitStore):
    """The store in one SQLite file. Safe to share between threads (one connection behind a lock)
    and between processes (WAL, busy timeout): several receivers may write one file."""

    dialect = "sqlite"

    def __init__(self, url: str | Path) -> None:
        self.path = sqlite_path(url)
        super().__init__(url)

    def _connect(self) -> None:
        try:
            if self.path.parent != Path(""):
                self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
            conn.row_factory = sqlite3.Row
            self._set_wal(conn)
            # A hit is acknowledged to the broker only after it is committed here; FULL makes that hold
            # through a power cut.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
        except (sqlite3.Error, OSError) as e:
            raise StoreError(f"cannot open hit store {self.path}: {e}") from None
        self.conn = conn

    @staticmethod
    def _set_wal(conn: sqlite3.Connection, wait_s: float = 30.0) -> None:
        """Put the file in WAL mode. Receivers started together on a new file race to switch it, and
        the loser gets "database is locked" at once (SQLite's busy timeout does not cover that
        switch), so it tries again until the winner is done, within the same 30 s as any lock."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Runner]:
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.DatabaseError as e:
            raise StoreError(f"cannot write to hit store {self.path}: {e}") from None
        try:
            yield _SqliteRunner(self.conn)
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute(sql, tuple(args)).fetchall()]

    def _lock_audit(self, q: Runner) -> None:
        """BEGIN IMMEDIATE already holds the database's only write lock."""

    def close(self) -> None:
        with self._lock:
            self.conn.close()
