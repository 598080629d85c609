"""The durable outbox: hits wait here, on disk, until the broker acknowledges them.

SQLite in WAL mode with synchronous=FULL: once `put` returns, the hit survives a kill -9 and a
power cut. Rows leave only through `ack` (the broker's PUBACK) or the size policy. The outbox is
bounded by `max_bytes` of stored hit data; when a new hit does not fit, the crops of the oldest
pending hits go first, hit records last, and every drop is counted (persistently, in the same
transaction) and logged, so nothing disappears silently.

The outbox checks on each put, take and ack that its file and lock file are still the ones it
opened (same inode): deleted or replaced, it raises OutboxGone rather than accept hits into a
file nobody will read again (and a second daemon could already hold the new path). The unit is
meant to stop then and be restarted (systemd). A file SQLite finds corrupt at start is moved
aside (``<name>.corrupt-<UTC time>``) and a new outbox started; the log says how many pending
hits the old file still counted.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, model_validator

from common.config import StrictModel

log = logging.getLogger(__name__)

COUNTERS = ("accepted", "sent", "crops_dropped_oversized", "crops_dropped_full", "hits_dropped_full")
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

    @model_validator(mode="after")
    def _crop_fits(self) -> OutboxConfig:
        if self.max_crop_bytes > self.max_bytes // 4:
            raise ValueError(
                f"max_crop_bytes ({self.max_crop_bytes}) must be at most a quarter of max_bytes "
                f"({self.max_bytes}) so one crop cannot push the whole outbox out; raise max_bytes or lower it"
            )
        return self


class OutboxError(RuntimeError):
    """The outbox file cannot be opened or written."""


class OutboxGone(OutboxError):
    """The outbox file or its lock file was deleted or replaced while open: stop the unit (it restarts
    with a fresh outbox); hits are no longer accepted, since nothing would ever send them."""


@dataclass(frozen=True)
class OutboxRow:
    """One pending hit: the record (JSON bytes, without crop), its crop, and why a crop is missing."""

    seq: int
    hit_id: str
    queued_at: float
    record: bytes
    crop: bytes | None
    crop_dropped: str | None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    hit_id TEXT NOT NULL UNIQUE,
    queued_at REAL NOT NULL,
    record BLOB NOT NULL,
    crop BLOB,
    crop_dropped TEXT,
    size INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class Outbox:
    """A bounded, crash-safe FIFO of hits, shared by one producer and one publisher thread.

    `take` hands out the next rows to publish and remembers them as in flight (they are never
    chosen for dropping: the transport already holds them); `ack` deletes rows the broker
    acknowledged; `release` puts in-flight rows back to be taken again.
    """

    def __init__(self, config: OutboxConfig) -> None:
        self.config = config
        self.path = Path(config.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutboxError(f"outbox.path: cannot create directory {self.path.parent}: {e}") from None
        self._lock_file = self._take_file_lock()
        self.moved_aside: Path | None = None  # where a corrupt file found at start was moved
        self.lost_pending: int | None = None  # how many pending hits that file counted (None: unreadable)
        try:
            rows, size = self._open_or_replace()
            self._identity = self._file_identity()
        except BaseException:
            self._release_file_lock()
            raise
        self._lock = threading.Lock()
        self._rows = int(rows)
        self._bytes = int(size)
        self._inflight: set[int] = set()
        self._cursor = 0
        self._closed = False
        self.gone: str | None = None  # why the outbox stopped accepting hits (file deleted or replaced)
        if rows:
            log.info("outbox %s: %d hits (%d bytes) pending from before, sending them first", self.path, rows, size)

    def _connect(self) -> tuple[int, int]:
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=10)
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise OutboxError(f"outbox.path: {self.path} cannot use WAL journaling (got {mode}); use a local disk")
        self._db.execute("PRAGMA synchronous=FULL")
        # Keep the WAL from growing without bound between checkpoints.
        self._db.execute("PRAGMA journal_size_limit=8388608")
        problems = [r[0] for r in self._db.execute("PRAGMA quick_check(5)").fetchall()]
        if problems != ["ok"]:
            raise _Corrupt("; ".join(str(p) for p in problems))
        self._db.executescript(_SCHEMA)
        self._db.executemany("INSERT OR IGNORE INTO counters(name, value) VALUES (?, 0)", [(c,) for c in COUNTERS])
        rows, size = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM outbox").fetchone()
        return int(rows), int(size)

    def _open_or_replace(self) -> tuple[int, int]:
        try:
            return self._connect()
        except OutboxError:
            self._close_db()
            raise
        except sqlite3.Error as e:
            self._close_db()
            if not _is_corruption(e) or not self.path.is_file():
                raise OutboxError(f"outbox.path: cannot open {self.path} as an SQLite outbox: {e}") from None
            self._move_aside(str(e))
        try:
            return self._connect()
        except sqlite3.Error as e:
            self._close_db()
            raise OutboxError(f"outbox.path: cannot start a new outbox at {self.path}: {e}") from None

    def _close_db(self) -> None:
        db = getattr(self, "_db", None)
        if db is not None:
            db.close()

    def _move_aside(self, reason: str) -> None:
        self.lost_pending = _count_pending(self.path)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        try:
            for suffix in ("", "-wal", "-shm"):
                src = Path(str(self.path) + suffix)
                if src.exists():
                    os.replace(src, str(aside) + suffix)
        except OSError as e:
            raise OutboxError(
                f"outbox.path: {self.path} is corrupt ({reason}) and cannot be moved aside: {e}; "
                "move or delete it by hand"
            ) from None
        self.moved_aside = aside
        pending = "an unknown number of" if self.lost_pending is None else str(self.lost_pending)
        log.error(
            "outbox %s is corrupt (%s): moved it aside to %s and started a new outbox; %s pending hits in it "
            "may be lost (try `sqlite3 %s .recover` to rescue them)",
            self.path,
            reason,
            aside,
            pending,
            aside,
        )

    def _file_identity(self) -> tuple[tuple[int, int], tuple[int, int]]:
        db, lock = os.stat(self.path), os.fstat(self._lock_file)
        return (db.st_dev, db.st_ino), (lock.st_dev, lock.st_ino)

    def check_present(self) -> None:
        """Raise OutboxGone if the file or lock file on disk is no longer the one this outbox holds."""
        if self.gone is not None:
            raise OutboxGone(self.gone)
        (db_id, lock_id) = self._identity
        problem = None
        for what, path, held in (("outbox file", self.path, db_id), ("lock file", self._lock_path, lock_id)):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                problem = f"its {what} {path} was deleted"
                break
            except OSError as e:
                problem = f"its {what} {path} cannot be checked ({e.strerror})"
                break
            if (st.st_dev, st.st_ino) != held:
                problem = f"its {what} {path} was replaced by another file"
                break
        if problem is not None:
            self.gone = (
                f"outbox {self.path}: {problem} while the unit ran; refusing hits from now on so none is "
                "accepted into a file nobody sends from: restart the unit (systemd does) to start a fresh outbox"
            )
            log.critical("%s", self.gone)
            raise OutboxGone(self.gone)

    def _take_file_lock(self) -> int:
        # Two publishers on one outbox would each send every row; refuse the second one.
        lock_path = self._lock_path
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise OutboxError(f"outbox.path: cannot create lock file {lock_path}: {e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutboxError(
                f"outbox.path: {self.path} is in use by another process (stop the other edge daemon, "
                f"or give this one its own outbox path)"
            ) from None
        return fd

    @property
    def _lock_path(self) -> str:
        return str(self.path) + ".lock"

    def _release_file_lock(self) -> None:
        fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        os.close(self._lock_file)

    # --- producer side ------------------------------------------------------------------------

    def put(self, hit_id: str, record: bytes, crop: bytes | None, queued_at: float | None = None) -> int | None:
        """Store one hit durably; returns its sequence number (the existing one if the hit is already
        pending), or None if it was dropped for lack of room (only when every other pending hit is
        in flight). A crop larger than
        `max_crop_bytes` is dropped here and counted. Raises OutboxError if the disk write fails."""
        queued_at = time.time() if queued_at is None else queued_at
        crop_dropped = None
        with self._lock:
            self._check_writable()
            bumps: dict[str, int] = {"accepted": 1}
            if crop is not None and len(crop) > self.config.max_crop_bytes:
                log.warning(
                    "hit %s: face crop of %d bytes is over outbox.max_crop_bytes (%d); sending the hit without it",
                    hit_id,
                    len(crop),
                    self.config.max_crop_bytes,
                )
                crop, crop_dropped = None, "oversized"
                bumps["crops_dropped_oversized"] = 1
            size = len(record) + (len(crop) if crop else 0)
            try:
                self._db.execute("BEGIN IMMEDIATE")
                already = self._db.execute("SELECT seq FROM outbox WHERE hit_id = ?", (hit_id,)).fetchone()
                if already:
                    self._db.execute("ROLLBACK")
                    log.debug("hit %s is already in the outbox; not stored twice", hit_id)
                    return int(already[0])
                excess = self._bytes + size - self.config.max_bytes
                freed = freed_rows = 0
                if excess > 0:
                    excess, freed = self._drop_crops(excess, bumps)
                    if excess > 0 and crop:
                        log.warning("outbox full: dropping the face crop of new hit %s (%d bytes)", hit_id, len(crop))
                        excess -= len(crop)
                        size -= len(crop)
                        crop, crop_dropped = None, "outbox_full"
                        bumps["crops_dropped_full"] = bumps.get("crops_dropped_full", 0) + 1
                    if excess > 0:
                        excess, freed_rows, freed_bytes = self._drop_records(excess, bumps)
                        freed += freed_bytes
                seq = None
                if excess > 0:
                    log.error(
                        "outbox full and every pending hit is in flight: dropping new hit %s (raise outbox.max_bytes)",
                        hit_id,
                    )
                    bumps["hits_dropped_full"] = bumps.get("hits_dropped_full", 0) + 1
                    del bumps["accepted"]
                    size = 0
                else:
                    seq = self._db.execute(
                        "INSERT INTO outbox(hit_id, queued_at, record, crop, crop_dropped, size) VALUES (?,?,?,?,?,?)",
                        (hit_id, queued_at, record, crop, crop_dropped, size),
                    ).lastrowid
                self._bump(bumps)
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                self._rollback()
                raise OutboxError(f"outbox {self.path}: cannot store hit {hit_id}: {e}") from None
            self._rows += (1 if seq is not None else 0) - freed_rows
            self._bytes += size - freed
            return None if seq is None else int(seq)

    def _drop_crops(self, excess: int, bumps: dict[str, int]) -> tuple[int, int]:
        freed = 0
        rows = self._db.execute("SELECT seq, hit_id, length(crop) FROM outbox WHERE crop IS NOT NULL ORDER BY seq")
        victims = []
        for seq, hit_id, n in rows:
            if excess <= 0:
                break
            if seq in self._inflight:
                continue
            victims.append((seq, hit_id, n))
            excess -= n
            freed += n
        for seq, hit_id, n in victims:
            self._db.execute(
                "UPDATE outbox SET crop = NULL, crop_dropped = 'outbox_full', size = size - ? WHERE seq = ?", (n, seq)
            )
            log.warning("outbox full: dropped the face crop of pending hit %s (%d bytes)", hit_id, n)
        if victims:
            bumps["crops_dropped_full"] = bumps.get("crops_dropped_full", 0) + len(victims)
        return excess, freed

    def _drop_records(self, excess: int, bumps: dict[str, int]) -> tuple[int, int, int]:
        freed = 0
        victims = []
        for seq, hit_id, n in self._db.execute("SELECT seq, hit_id, size FROM outbox ORDER BY seq"):
            if excess <= 0:
                break
            if seq in self._inflight:
                continue
            victims.append((seq, hit_id))
            excess -= n
            freed += n
        for seq, hit_id in victims:
            self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
            log.error("outbox full: dropped pending hit %s entirely (raise outbox.max_bytes)", hit_id)
        if victims:
            bumps["hits_dropped_full"] = bumps.get("hits_dropped_full", 0) + len(victims)
        return excess, len(victims), freed

    def _bump(self, bumps: dict[str, int]) -> None:
        self._db.executemany(
            "UPDATE counters SET value = value + ? WHERE name = ?", [(n, name) for name, n in bumps.items() if n]
        )

    def _rollback(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    def _check_open(self) -> None:
        if self._closed:
            raise OutboxError(f"outbox {self.path} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        self.check_present()

    # --- publisher side -----------------------------------------------------------------------

    def take(self, limit: int) -> list[OutboxRow]:
        """The next `limit` pending rows in order that are not already in flight; marks them in flight."""
        if limit <= 0:
            return []
        with self._lock:
            self._check_open()
            rows = self._db.execute(
                "SELECT seq, hit_id, queued_at, record, crop, crop_dropped FROM outbox WHERE seq > ? "
                "ORDER BY seq LIMIT ?",
                (self._cursor, limit + len(self._inflight)),
            ).fetchall()
            out = []
            for seq, hit_id, queued_at, record, crop, dropped in rows:
                if seq in self._inflight:
                    continue
                out.append(OutboxRow(seq, hit_id, queued_at, bytes(record), bytes(crop) if crop else None, dropped))
                self._inflight.add(seq)
                if len(out) == limit:
                    break
            if out:
                self._cursor = max(self._cursor, out[-1].seq)
            return out

    def ack(self, seqs: list[int]) -> int:
        """Delete rows the broker acknowledged (one transaction); returns how many were still there."""
        if not seqs:
            return 0
        with self._lock:
            self._check_writable()
            try:
                self._db.execute("BEGIN IMMEDIATE")
                marks = ",".join("?" * len(seqs))
                gone = self._db.execute(
                    f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM outbox WHERE seq IN ({marks})", seqs
                ).fetchone()
                self._db.execute(f"DELETE FROM outbox WHERE seq IN ({marks})", seqs)
                self._bump({"sent": int(gone[0])})
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                self._rollback()
                raise OutboxError(f"outbox {self.path}: cannot remove acknowledged hits: {e}") from None
            self._inflight.difference_update(seqs)
            self._rows -= int(gone[0])
            self._bytes -= int(gone[1])
            return int(gone[0])

    def release(self, seqs: list[int]) -> None:
        """Return in-flight rows to the queue so `take` hands them out again, oldest first."""
        with self._lock:
            seqs = [s for s in seqs if s in self._inflight]
            if seqs:
                self._inflight.difference_update(seqs)
                self._cursor = min(self._cursor, min(seqs) - 1)

    # --- figures ------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        return self._rows

    @property
    def pending_bytes(self) -> int:
        return self._bytes

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def counters(self) -> dict[str, int]:
        """Totals since the outbox file was created: accepted, sent, and each kind of drop."""
        with self._lock:
            self._check_open()
            return {name: int(v) for name, v in self._db.execute("SELECT name, value FROM counters")}

    def stats(self) -> dict[str, int]:
        """Depth, bytes and counters, as the heartbeat reports them."""
        out = {"pending": self._rows, "pending_bytes": self._bytes, "max_bytes": self.config.max_bytes}
        out.update(self.counters())
        return out

    def rows(self) -> list[OutboxRow]:
        """Every pending row in order (for inspection and tests; the publisher uses `take`)."""
        with self._lock:
            self._check_open()
            return [
                OutboxRow(seq, h, q, bytes(r), bytes(c) if c else None, d)
                for seq, h, q, r, c, d in self._db.execute(
                    "SELECT seq, hit_id, queued_at, record, crop, crop_dropped FROM outbox ORDER BY seq"
                )
            ]

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._db.close()
            finally:
                self._release_file_lock()


class _Corrupt(sqlite3.DatabaseError):
    """SQLite's integrity check found damage."""


_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26


def _is_corruption(e: sqlite3.Error) -> bool:
    # Only damage moves a file aside; "cannot open" (permissions, a folder) is the user's to fix.
    code = getattr(e, "sqlite_errorcode", None)
    return isinstance(e, _Corrupt) or (code is not None and code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB))


def _count_pending(path: Path) -> int | None:
    """How many rows a (possibly corrupt) outbox file still counts, or None if it cannot tell."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        finally:
            db.close()
    except sqlite3.Error:
        return None
