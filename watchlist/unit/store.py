"""The unit's watchlist store: one SQLite file holding the applied list, the key set, and a short log.

Every bundle is applied in one transaction, so a power cut or SIGKILL leaves the old list or the
new one, never a mix (SQLite's journal). `secure_delete` makes SQLite overwrite the pages a
removed person's embeddings occupied, so they do not linger in the file.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.sqlite import open_database
from matching.matcher import TemplateIndex
from watchlist.format.bundle import Bundle
from watchlist.format.errors import StoreError
from watchlist.format.listing import person_row
from watchlist.format.verify import Verified

SCHEMA_VERSION = 1
EVENTS_KEPT = 200
_DELETE_CHUNK = 500
_LOAD_CHUNK = 65536

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS persons (
    person_id TEXT PRIMARY KEY,
    name TEXT,
    priority INTEGER NOT NULL DEFAULT 0,
    threshold REAL
);
CREATE TABLE IF NOT EXISTS templates (
    id INTEGER PRIMARY KEY,
    person_id TEXT NOT NULL REFERENCES persons(person_id),
    ordinal INTEGER NOT NULL,
    photo_date TEXT,
    age INTEGER,
    embedding BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS templates_person ON templates(person_id);
CREATE TABLE IF NOT EXISTS keysets (serial INTEGER PRIMARY KEY, envelope BLOB NOT NULL, stored_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    version INTEGER,
    reason TEXT,
    detail TEXT,
    source TEXT
);
"""


@dataclass(frozen=True)
class StoreState:
    """The applied list as the store records it (version 0: nothing applied yet)."""

    version: int = 0
    kind: str | None = None
    model_id: str | None = None
    embedding_dim: int | None = None
    default_threshold: float | None = None
    created_at: int | None = None
    expires_at: int | None = None
    bundle_sha256: str | None = None
    signing_key_id: str | None = None
    applied_at: float | None = None
    embedding_offset: tuple[float, ...] | None = None  # what stored rows are relative to


class UnitStore:
    """The applied watchlist in SQLite.

    Example::

        store = UnitStore("/var/lib/checkpoint/watchlist.db")
        store.apply(verified)            # one transaction
        index = store.load_index()       # for the matcher at start-up
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot open watchlist store {self.path}: {exc}") from None
        # The unit's threads share this connection; watchlist.unit.apply.Watchlist serializes them.
        self.db = open_database(
            self.path,
            marker_table="meta",
            schema=_SCHEMA,
            schema_version=str(SCHEMA_VERSION),
            error=StoreError,
            what="watchlist store",
            not_ours="not a watchlist store; point [watchlist] store elsewhere",
            threaded=True,
            pragmas=("synchronous = FULL",),
        )
        schema = self._meta().get("schema")
        if schema != SCHEMA_VERSION:
            raise StoreError(f"{self.path} has store schema {schema}, this version reads {SCHEMA_VERSION}")

    def close(self) -> None:
        self.db.close()

    # ---- reading ------------------------------------------------------------------------------

    def _meta(self) -> dict:
        return {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM meta").fetchall()}

    def _set_meta(self, values: dict) -> None:
        self.db.conn.executemany(
            "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [(k, json.dumps(v)) for k, v in values.items()],
        )

    def state(self) -> StoreState:
        """The applied list's version, model and times."""
        m = self._meta()
        return StoreState(
            version=int(m.get("version", 0)),
            kind=m.get("kind"),
            model_id=m.get("model_id"),
            embedding_dim=m.get("embedding_dim"),
            default_threshold=m.get("default_threshold"),
            created_at=m.get("created_at"),
            expires_at=m.get("expires_at"),
            bundle_sha256=m.get("bundle_sha256"),
            signing_key_id=m.get("signing_key_id"),
            applied_at=m.get("applied_at"),
            embedding_offset=None if m.get("embedding_offset") is None else tuple(m["embedding_offset"]),
        )

    def counts(self) -> tuple[int, int]:
        """(persons, templates) in the applied list."""
        p = self.db.execute("SELECT count(*) FROM persons").fetchone()[0]
        t = self.db.execute("SELECT count(*) FROM templates").fetchone()[0]
        return int(p), int(t)

    def keyset_envelope(self) -> bytes | None:
        """The newest key set accepted, as signed bytes (verify it again before trusting it)."""
        row = self.db.execute("SELECT envelope FROM keysets ORDER BY serial DESC LIMIT 1").fetchone()
        return None if row is None else bytes(row[0])

    def person_ids(self) -> list[str]:
        """The person ids of the applied list, sorted."""
        return [r[0] for r in self.db.execute("SELECT person_id FROM persons ORDER BY person_id").fetchall()]

    def persons(self) -> list[dict]:
        """Who is on the applied list, sorted by person id: one watchlist.format.listing.person_row
        each (id, name where the bundle carried names, priority, threshold override, and the photo
        date or age of each template). For people and scripts (`edge watchlist list`); the matcher
        reads load_index() instead."""
        templates: dict[str, list[tuple[str | None, int | None]]] = {}
        for pid, date, age in self.db.execute("SELECT person_id, photo_date, age FROM templates ORDER BY id"):
            templates.setdefault(pid, []).append((date, age))
        return [
            person_row(pid, name=name, priority=prio, threshold=thr, templates=templates.get(pid, []))
            for pid, name, prio, thr in self.db.execute(
                "SELECT person_id, name, priority, threshold FROM persons ORDER BY person_id"
            )
        ]

    def _template_rows(self) -> Iterator[list[tuple[str, bytes]]]:
        cur = self.db.execute("SELECT person_id, embedding FROM templates ORDER BY id")
        while rows := cur.fetchmany(_LOAD_CHUNK):
            yield rows

    def load_index(self) -> TemplateIndex:
        """The matcher index for the applied list (empty at version 0)."""
        st = self.state()
        dim = st.embedding_dim or 128
        if st.version == 0:
            return TemplateIndex.empty(dim)
        _, n = self.counts()
        emb = np.empty((n, dim), dtype=np.float16)
        pids: list[str] = []
        interned: dict[str, str] = {}
        pos = 0
        for rows in self._template_rows():
            block = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f2").reshape(len(rows), dim)
            emb[pos : pos + len(rows)] = block
            pos += len(rows)
            pids.extend(interned.setdefault(r[0], r[0]) for r in rows)
        thresholds = dict(
            self.db.execute("SELECT person_id, threshold FROM persons WHERE threshold IS NOT NULL").fetchall()
        )
        offset = None if st.embedding_offset is None else np.array(st.embedding_offset, dtype=np.float32)
        return TemplateIndex.build(
            pids,
            emb[:pos],
            offset=offset,
            thresholds=thresholds,
            version=st.version,
            model_id=st.model_id or "",
            default_threshold=float(st.default_threshold if st.default_threshold is not None else 1.0),
        )

    def events(self, limit: int = 20) -> list[dict]:
        """The latest applied/rejected events, newest first."""
        rows = self.db.execute(
            "SELECT at, kind, version, reason, detail, source FROM events ORDER BY id DESC LIMIT ?", [limit]
        ).fetchall()
        return [dict(zip(("at", "kind", "version", "reason", "detail", "source"), r)) for r in rows]

    # ---- writing ------------------------------------------------------------------------------

    def record_event(
        self,
        kind: str,
        *,
        version: int | None = None,
        reason: str | None = None,
        detail: str | None = None,
        source: str | None = None,
        at: float | None = None,
    ) -> None:
        """Log an event (kept: the last EVENTS_KEPT)."""
        with self.db.atomic():
            self._insert_event(kind, version, reason, detail, source, at)

    def _insert_event(
        self,
        kind: str,
        version: int | None,
        reason: str | None,
        detail: str | None,
        source: str | None,
        at: float | None,
    ) -> None:
        self.db.execute(
            "INSERT INTO events(at, kind, version, reason, detail, source) VALUES (?, ?, ?, ?, ?, ?)",
            [time.time() if at is None else at, kind, version, reason, detail, source],
        )
        self.db.execute("DELETE FROM events WHERE id <= (SELECT max(id) FROM events) - ?", [EVENTS_KEPT])

    def save_keyset(self, serial: int, envelope: bytes) -> None:
        """Keep a newer verified key set (on its own transaction)."""
        with self.db.atomic():
            self._save_keyset(serial, envelope)

    def _save_keyset(self, serial: int, envelope: bytes) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO keysets(serial, envelope, stored_at) VALUES (?, ?, ?)",
            [serial, envelope, time.time()],
        )

    def apply(self, verified: Verified, *, source: str = "", applied_at: float | None = None) -> None:
        """Write a verified bundle in one transaction: all of it, or (on any failure) none of it."""
        b = verified.bundle
        at = time.time() if applied_at is None else applied_at
        try:
            self._apply(verified, b, source, at)
        except sqlite3.Error as exc:
            raise StoreError(
                f"could not write watchlist version {b.version} to {self.path} ({exc}); the store keeps "
                f"version {self.state().version} (check free disk space and file permissions)"
            ) from None

    def _apply(self, verified: Verified, b: Bundle, source: str, at: float) -> None:
        with self.db.atomic():
            if b.kind == "full":
                self.db.execute("DELETE FROM templates")
                self.db.execute("DELETE FROM persons")
            else:
                self._delete_persons(list(b.removed) + [p.person_id for p in b.persons])
            self._insert_persons(b)
            self._save_keyset(verified.keyset.serial, verified.keyset.envelope)
            if b.kind == "full":
                self._set_meta(
                    {"embedding_offset": None if b.embedding_offset is None else [float(v) for v in b.embedding_offset]}
                )
            self._set_meta(
                {
                    "version": b.version,
                    "kind": b.kind,
                    "model_id": b.model_id,
                    "embedding_dim": b.embedding_dim,
                    "default_threshold": b.default_threshold,
                    "created_at": b.created_at,
                    "expires_at": b.expires_at,
                    "bundle_sha256": verified.sha256,
                    "signing_key_id": verified.signing_key_id,
                    "applied_at": at,
                }
            )
            self._insert_event(
                "applied",
                b.version,
                None,
                f"{b.kind} bundle: {len(b.persons)} persons in, {len(b.removed)} removed",
                source,
                at,
            )

    def _delete_persons(self, ids: list[str]) -> None:
        for start in range(0, len(ids), _DELETE_CHUNK):
            chunk = ids[start : start + _DELETE_CHUNK]
            marks = ",".join("?" * len(chunk))
            self.db.execute(f"DELETE FROM templates WHERE person_id IN ({marks})", chunk)
            self.db.execute(f"DELETE FROM persons WHERE person_id IN ({marks})", chunk)

    def _insert_persons(self, b: Bundle) -> None:
        self.db.conn.executemany(
            "INSERT INTO persons(person_id, name, priority, threshold) VALUES (?, ?, ?, ?)",
            [(p.person_id, p.name, p.priority, p.threshold) for p in b.persons],
        )
        self.db.conn.executemany(
            "INSERT INTO templates(person_id, ordinal, photo_date, age, embedding) VALUES (?, ?, ?, ?, ?)",
            (
                (p.person_id, j, t.photo_date, t.age, row.tobytes())
                for i, p in enumerate(b.persons)
                for j, (t, row) in enumerate(zip(p.templates, b.rows_of(i)))
            ),
        )
