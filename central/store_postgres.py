"""The PostgreSQL hit store, for a centre where several receivers and consoles share one database.

psycopg 3, one connection per store object behind a lock. Statements are the same as SQLite's
(written with `?`, turned into `%s` here). Appends to the audit chain and migrations take a
transaction-scoped advisory lock, so receivers in one shared-subscription group never fork the
chain; decisions lock the hit's row.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Sequence
from typing import Any

from central.store import HitStore
from central.store_core import Runner, StoreError

log = logging.getLogger(__name__)

# An arbitrary constant that names "the checkpoint audit chain" among advisory locks.
_AUDIT_LOCK = 0x636B7074
_PASSWORD = re.compile(r"(://[^:/@]*:)[^@]*@")


def _sql(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")


class _PgRunner(Runner):
    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def __call__(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cur = self.conn.execute(_sql(sql), tuple(args))
        self.rowcount = cur.rowcount
        return list(cur.fetchall()) if cur.description else []


class PostgresHitStore(HitStore):
    """The store in a PostgreSQL database named by a `postgresql://` URL."""

    dialect = "postgresql"
    greatest = "greatest"
    for_update = " FOR UPDATE"

    def __init__(self, url: str) -> None:
        self.url = url
        super().__init__(_PASSWORD.sub(r"\1***@", url))

    def _connect(self) -> None:
        try:
            import psycopg
            from psycopg.rows import dict_row
        except ImportError:
            raise StoreError("a postgresql:// store needs psycopg 3: pip install 'psycopg>=3.1'") from None
        try:
            self.conn = psycopg.connect(self.url, autocommit=True, row_factory=dict_row, connect_timeout=10)
        except psycopg.Error as e:
            raise StoreError(f"cannot connect to the hit store {self.location}: {str(e).strip()}") from None

    def _ensure(self) -> None:
        # A dropped connection (database restart) is reopened on the next use; the receiver retries
        # the batch that failed.
        if self.conn.closed or self.conn.broken:
            log.warning("hit store %s: connection lost, reconnecting", self.location)
            self._connect()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Runner]:
        self._ensure()
        with self.conn.transaction():
            yield _PgRunner(self.conn)

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        self._ensure()
        return list(self.conn.execute(_sql(sql), tuple(args)).fetchall())

    def _lock_audit(self, q: Runner) -> None:
        q("SELECT pg_advisory_xact_lock(?)", (_AUDIT_LOCK,))

    def close(self) -> None:
        with self._lock:
            self.conn.close()
