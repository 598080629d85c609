"""The operators' hit store: one SQLite file with hits, their crops, units and rejected messages.

Shaped for a web console to sit on later: `hits` carries a review state (pending / confirmed /
rejected, who and when), `crops` keeps the JPEGs apart so listing hits stays cheap, `units` holds
each unit's status and last heartbeat, `rejects` keeps messages that did not follow the protocol
(so a bad message is never silently lost). WAL mode, so readers never block the receiver.
Everything here has a retention limit: `purge` removes hits, crops and rejects older than it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import sqlite_utils

REVIEW_STATES = ("pending", "confirmed", "rejected")
STORE_VERSION = 1
STALE_AFTER_INTERVALS = 3.0

HIT_COLUMNS = (
    "id",
    "site",
    "unit_id",
    "camera_id",
    "person_id",
    "captured_at",
    "queued_at",
    "received_at",
    "score",
    "threshold",
    "margin",
    "box",
    "model_id",
    "watchlist_version",
    "track_id",
    "has_crop",
    "crop_dropped",
    "schema_version",
)


class StoreError(RuntimeError):
    """The store cannot be opened, or was asked for something it does not hold."""


class HitStore:
    """Hits (each stored once, by id), crops, unit status and heartbeats in one SQLite file.

    Safe to share between threads (one connection behind a lock) and between processes (WAL,
    busy timeout): several receivers may write one file, a console may read it.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            if self.path.parent != Path(""):
                self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            # A hit is acknowledged to the broker only after it is committed here; FULL makes that hold
            # through a power cut.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            self.db = sqlite_utils.Database(conn)
            self._lock = threading.RLock()
            self._create()
        except sqlite3.Error as e:
            raise StoreError(f"cannot open hit store {self.path}: {e}") from None

    def _create(self) -> None:
        db = self.db
        db["meta"].create({"key": str, "value": str}, pk="key", if_not_exists=True)
        db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('store_version', ?)", (str(STORE_VERSION),))
        db["hits"].create(
            {
                "id": str,
                "site": str,
                "unit_id": str,
                "camera_id": str,
                "person_id": str,
                "captured_at": float,
                "queued_at": float,
                "received_at": float,
                "score": float,
                "threshold": float,
                "margin": float,
                "box": str,
                "model_id": str,
                "watchlist_version": int,
                "track_id": int,
                "has_crop": int,
                "crop_dropped": str,
                "schema_version": int,
                "review_state": str,
                "reviewed_by": str,
                "reviewed_at": float,
                "review_note": str,
            },
            pk="id",
            not_null=["site", "unit_id", "camera_id", "person_id", "captured_at", "received_at", "review_state"],
            defaults={"review_state": "pending", "has_crop": 0},
            if_not_exists=True,
        )
        db["crops"].create(
            {"hit_id": str, "jpeg": bytes, "bytes": int},
            pk="hit_id",
            foreign_keys=[("hit_id", "hits", "id")],
            if_not_exists=True,
        )
        db["units"].create(
            {
                "site": str,
                "unit_id": str,
                "state": str,
                "state_reason": str,
                "state_at": float,
                "last_seen": float,
                "last_heartbeat_at": float,
                "heartbeat_interval_s": float,
                "heartbeat": str,
                "hits": int,
            },
            pk=("site", "unit_id"),
            defaults={"state": "unknown", "hits": 0},
            if_not_exists=True,
        )
        db["rejects"].create(
            {"id": int, "received_at": float, "topic": str, "error": str, "payload": bytes},
            pk="id",
            if_not_exists=True,
        )
        db["hits"].create_index(["received_at"], if_not_exists=True)
        db["hits"].create_index(["review_state", "received_at"], if_not_exists=True)
        db["hits"].create_index(["site", "unit_id", "captured_at"], if_not_exists=True)
        db["hits"].create_index(["person_id", "captured_at"], if_not_exists=True)

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self.db.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    # --- writing (receiver) -------------------------------------------------------------------

    def add_hits(self, items: list[tuple[dict[str, Any], bytes | None, float]]) -> list[bool]:
        """Store decoded hits (fields, crop, received_at) in one transaction; for each, True if it
        was new, False if a hit with that id was already stored (a duplicate delivery)."""
        new: list[bool] = []
        cols = ",".join(HIT_COLUMNS)
        marks = ",".join("?" * len(HIT_COLUMNS))
        with self._tx() as conn:
            for fields, crop, received_at in items:
                row = dict(fields)
                row["received_at"] = received_at
                row["box"] = json.dumps(fields["box"])
                row["has_crop"] = 1 if crop else 0
                row["schema_version"] = fields.get("v")
                cur = conn.execute(
                    f"INSERT OR IGNORE INTO hits({cols}) VALUES ({marks})", [row.get(c) for c in HIT_COLUMNS]
                )
                inserted = cur.rowcount == 1
                new.append(inserted)
                if not inserted:
                    continue
                if crop:
                    conn.execute("INSERT INTO crops(hit_id, jpeg, bytes) VALUES (?,?,?)", (row["id"], crop, len(crop)))
                conn.execute(
                    "INSERT INTO units(site, unit_id, last_seen, hits) VALUES (?,?,?,1) "
                    "ON CONFLICT(site, unit_id) DO UPDATE SET hits = hits + 1, "
                    "last_seen = max(coalesce(last_seen, 0), excluded.last_seen)",
                    (row["site"], row["unit_id"], received_at),
                )
        return new

    def add_hit(self, fields: dict[str, Any], crop: bytes | None, received_at: float | None = None) -> bool:
        """Store one decoded hit; True if new."""
        return self.add_hits([(fields, crop, time.time() if received_at is None else received_at)])[0]

    def set_unit_status(self, site: str, unit_id: str, state: str, reason: str, at: float, seen_at: float) -> bool:
        """Record a unit's status ('online'/'offline') as of `at`; an older report than the one
        stored (a retained message replayed on subscribe) is ignored. True if applied."""
        with self._tx() as conn:
            cur = conn.execute(
                "INSERT INTO units(site, unit_id, state, state_reason, state_at, last_seen) VALUES (?,?,?,?,?,?) "
                "ON CONFLICT(site, unit_id) DO UPDATE SET state = excluded.state, "
                "state_reason = excluded.state_reason, state_at = excluded.state_at, "
                "last_seen = max(coalesce(last_seen, 0), excluded.last_seen) "
                "WHERE coalesce(units.state_at, 0) <= excluded.state_at",
                (site, unit_id, state, reason, at, seen_at),
            )
            return cur.rowcount == 1

    def set_heartbeat(self, site: str, unit_id: str, body: dict[str, Any], at: float) -> None:
        """Record a unit's latest heartbeat (older ones than stored are ignored)."""
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO units(site, unit_id, last_seen, last_heartbeat_at, heartbeat_interval_s, heartbeat) "
                "VALUES (?,?,?,?,?,?) ON CONFLICT(site, unit_id) DO UPDATE SET "
                "last_heartbeat_at = excluded.last_heartbeat_at, "
                "heartbeat_interval_s = excluded.heartbeat_interval_s, heartbeat = excluded.heartbeat, "
                "last_seen = max(coalesce(last_seen, 0), excluded.last_seen) "
                "WHERE coalesce(units.last_heartbeat_at, 0) <= excluded.last_heartbeat_at",
                (site, unit_id, at, at, float(body.get("interval_s", 0)), json.dumps(body)),
            )

    def add_reject(self, topic: str, payload: bytes, error: str, received_at: float | None = None) -> None:
        """Keep a message that did not follow the protocol, with why, for someone to look at."""
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO rejects(received_at, topic, error, payload) VALUES (?,?,?,?)",
                (time.time() if received_at is None else received_at, topic, error, payload),
            )

    # --- review (console) ---------------------------------------------------------------------

    def set_review(self, hit_id: str, state: str, by: str, note: str | None = None) -> None:
        """Mark a hit confirmed, rejected or back to pending, with who did it."""
        if state not in REVIEW_STATES:
            raise StoreError(f"review state must be one of {', '.join(REVIEW_STATES)}, got {state!r}")
        if not by:
            raise StoreError("say who reviewed the hit (reviewer name must not be empty)")
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE hits SET review_state = ?, reviewed_by = ?, reviewed_at = ?, review_note = ? WHERE id = ?",
                (state, by, time.time(), note, hit_id),
            )
            if cur.rowcount != 1:
                raise StoreError(f"no hit with id {hit_id!r} in {self.path}")

    # --- reading ------------------------------------------------------------------------------

    @staticmethod
    def _hit_row(row: dict[str, Any]) -> dict[str, Any]:
        row = dict(row)
        row["box"] = json.loads(row["box"]) if row.get("box") else None
        row["has_crop"] = bool(row.get("has_crop"))
        return row

    def hits(
        self,
        *,
        limit: int | None = 50,
        since: float | None = None,
        review_state: str | None = None,
        newest_first: bool = True,
    ) -> list[dict[str, Any]]:
        """Stored hits (without crops), newest first unless asked otherwise."""
        where, args = [], []
        if since is not None:
            where.append("received_at >= ?")
            args.append(since)
        if review_state is not None:
            where.append("review_state = ?")
            args.append(review_state)
        with self._lock:
            rows = self.db["hits"].rows_where(
                " AND ".join(where) or None,
                args,
                order_by="received_at DESC, rowid DESC" if newest_first else "received_at, rowid",
                limit=limit,
            )
            return [self._hit_row(r) for r in rows]

    def hit(self, hit_id: str) -> dict[str, Any] | None:
        with self._lock:
            rows = list(self.db["hits"].rows_where("id = ?", [hit_id]))
        return self._hit_row(rows[0]) if rows else None

    def crop(self, hit_id: str) -> bytes | None:
        """The face crop JPEG of a hit, or None if it came without one."""
        with self._lock:
            row = self.db.execute("SELECT jpeg FROM crops WHERE hit_id = ?", (hit_id,)).fetchone()
        return bytes(row[0]) if row else None

    def count_hits(self) -> int:
        with self._lock:
            return int(self.db.execute("SELECT COUNT(*) FROM hits").fetchone()[0])

    def rejects(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.db["rejects"].rows_where(order_by="id"))

    def units(self, now: float | None = None) -> list[dict[str, Any]]:
        """Every unit heard from, with `health`: 'offline' (said so, or its Last Will), 'stale' (no
        heartbeat for 3 intervals), 'online', or 'unknown'."""
        now = time.time() if now is None else now
        with self._lock:
            rows = list(self.db["units"].rows_where(order_by="site, unit_id"))
        out = []
        for row in rows:
            row["heartbeat"] = json.loads(row["heartbeat"]) if row.get("heartbeat") else None
            interval = row.get("heartbeat_interval_s") or 0
            last_hb = row.get("last_heartbeat_at")
            if row.get("state") == "offline":
                health = "offline"
            elif last_hb and interval and now - last_hb > STALE_AFTER_INTERVALS * interval:
                health = "stale"
            elif row.get("state") == "online":
                health = "online"
            else:
                health = "unknown"
            row["health"] = health
            out.append(row)
        return out

    def export_jsonl(self, fh: IO[str], *, since: float | None = None, with_crops: bool = False) -> int:
        """Write hits oldest first, one JSON object per line; crops as base64 if asked. Returns the count."""
        n = 0
        for row in self.hits(limit=None, since=since, newest_first=False):
            if with_crops:
                crop = self.crop(row["id"])
                row["crop_jpeg_b64"] = base64.b64encode(crop).decode("ascii") if crop else None
            fh.write(json.dumps(row, separators=(",", ":")) + "\n")
            n += 1
        return n

    def purge(self, older_than_s: float, now: float | None = None) -> int:
        """Delete hits (with crops) and rejects received more than `older_than_s` ago; returns hits deleted."""
        cutoff = (time.time() if now is None else now) - older_than_s
        with self._tx() as conn:
            conn.execute("DELETE FROM crops WHERE hit_id IN (SELECT id FROM hits WHERE received_at < ?)", (cutoff,))
            n = conn.execute("DELETE FROM hits WHERE received_at < ?", (cutoff,)).rowcount
            conn.execute("DELETE FROM rejects WHERE received_at < ?", (cutoff,))
        return int(n)

    def close(self) -> None:
        with self._lock:
            self.db.conn.close()
