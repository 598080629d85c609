"""The outbox's SQLite file: its schema, its rollback journal and the room kept in it, its lock, the
check that it is still the file the unit opened, its counters, and what went wrong writing it.

SQLite with a persistent rollback journal and synchronous=FULL: once a transaction commits, it
survives a kill -9 and a power cut.

Why a rollback journal and not WAL: a WAL holds every change until a checkpoint copies it into the
database file, so on a full disk it can hold the space the checkpoint needs, and then nothing, not
even a delete, can be written (the outbox of issue 20 stayed stuck after space came back). With a
rollback journal an insert that does not fit is rolled back whole, and a delete only copies the few
pages it changes into the journal. The journal is kept (``journal_mode=PERSIST``) at a fixed size
(`JOURNAL_RESERVE`, zeros after its header), so that room is always there for deletes: acknowledged
hits can be removed and old crops dropped on a disk with no byte left. Pages freed inside the file
are reused by the next hits. The WAL's shared-memory index was also memory-mapped, and a write to it
after the file was made immutable (chattr +i) killed the process with SIGBUS; without WAL and with
``mmap_size=0`` SQLite only uses read() and write(), whose errors come back as errors.

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
import time
from pathlib import Path

from wire.records import OUTBOX_CONTEXT_COUNTERS, OUTBOX_COUNTERS, OUTBOX_VERDICT_COUNTERS

log = logging.getLogger(__name__)

COUNTERS = (*OUTBOX_COUNTERS, *OUTBOX_VERDICT_COUNTERS, *OUTBOX_CONTEXT_COUNTERS)
# Row states. 0 -> 1 (the broker's PUBACK) changes no row's size: SQLite stores the integers 0 and 1
# in the record header alone, so marking hits sent needs no new page on a full disk.
PENDING, AWAITING, QUARANTINED = 0, 1, 2
STATE_NAMES = {PENDING: "pending", AWAITING: "awaiting_verdict", QUARANTINED: "quarantined"}
# Room kept in the rollback journal for the next transaction: a delete of a window of acknowledged
# hits or a drop of old crops changes a few dozen 4 KiB pages at most (freed pages are not copied).
JOURNAL_RESERVE = 512 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    hit_id TEXT NOT NULL UNIQUE,
    queued_at REAL NOT NULL,
    record BLOB NOT NULL,
    crop BLOB,
    crop_dropped TEXT,
    size INTEGER NOT NULL,
    state INTEGER NOT NULL DEFAULT 0,
    reason TEXT,
    error TEXT
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS contexts (seq INTEGER PRIMARY KEY, frame BLOB, dropped TEXT);
CREATE TRIGGER IF NOT EXISTS contexts_go_with_their_hit AFTER DELETE ON outbox
    BEGIN DELETE FROM contexts WHERE seq = old.seq; END;
CREATE VIEW IF NOT EXISTS held AS
    SELECT outbox.seq AS seq, outbox.hit_id AS hit_id, outbox.state AS state,
           outbox.size + COALESCE(length(contexts.frame), 0) AS size
    FROM outbox LEFT JOIN contexts ON contexts.seq = outbox.seq;
"""
# A hit's context frame lives in its own table, not in the hit's row: SQLite rewrites a whole row on
# any change of its size, and on a full disk the row's crop could not be written again to drop the
# frame beside it. `size` in `outbox` is the record and crop; `held` adds the frame, for the bounds.


class OutboxError(RuntimeError):
    """The outbox file cannot be opened or written."""


class OutboxGone(OutboxError):
    """The outbox file or its lock file was deleted or replaced while open: stop the unit (it restarts
    with a fresh outbox); hits are no longer accepted, since nothing would ever send them."""


class OutboxFile:
    """The open outbox file, held under an exclusive lock on ``<path>.lock``.

    Opening creates the folder and the tables, upgrades an outbox from before verdicts, and moves a
    corrupt file aside (`moved_aside`, `lost_pending`); `held_at_open` is what the file held then:
    (rows, bytes of hit data). `problem` says what keeps the file from being written (a full disk, a
    write that failed), None while all is well; `gone` why hits are refused for good (the file was
    deleted or replaced). Callers hold the outbox's lock around every use of `db`.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutboxError(f"outbox.path: cannot create directory {self.path.parent}: {e}") from None
        self._lock_file = self._take_file_lock()
        self.moved_aside: Path | None = None  # where a corrupt file found at start was moved
        self.lost_pending: int | None = None  # how many pending hits that file counted (None: unreadable)
        self.problem: str | None = None
        self._problem_kind = ""  # 'full' (the disk had no room) or 'write' (a write failed otherwise)
        self._journal_warned = False
        self.gone: str | None = None  # why the outbox stopped accepting hits (file deleted or replaced)
        try:
            self.held_at_open = self._open_or_replace()
            self._identity = self._file_identity()
        except BaseException:
            self._release_file_lock()
            raise

    # --- opening ------------------------------------------------------------------------------

    def _connect(self) -> tuple[int, int]:
        self.db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=10)
        # No memory-mapped I/O: a write to a mapped page of a file that became unwritable is a SIGBUS.
        self.db.execute("PRAGMA mmap_size=0")
        mode = self.db.execute("PRAGMA journal_mode=PERSIST").fetchone()[0]
        if str(mode).lower() != "persist":
            raise OutboxError(
                f"outbox.path: {self.path} cannot switch to a rollback journal (still {mode}): an older unit's "
                "WAL could not be folded into the file; free space on its disk and restart the unit"
            )
        self.db.execute("PRAGMA synchronous=FULL")
        # The journal never shrinks below what it holds in reserve, nor stays larger.
        self.db.execute(f"PRAGMA journal_size_limit={JOURNAL_RESERVE}")
        # Freed pages are not overwritten with zeros (Debian builds SQLite with secure_delete on): zeroing
        # copies every freed page into the journal, so dropping a crop would need as much room as the crop.
        self.db.execute("PRAGMA secure_delete=FAST")
        problems = [r[0] for r in self.db.execute("PRAGMA quick_check(5)").fetchall()]
        if problems != ["ok"]:
            raise _Corrupt("; ".join(str(p) for p in problems))
        self.db.executescript(_SCHEMA)
        columns = {r[1] for r in self.db.execute("PRAGMA table_info(outbox)")}
        # An outbox from before verdicts: its rows are all pending. Adding a column rewrites no row.
        # (One from before context frames gets their table from _SCHEMA, empty.)
        for column, decl in (("state", "INTEGER NOT NULL DEFAULT 0"), ("reason", "TEXT"), ("error", "TEXT")):
            if column not in columns:
                self.db.execute(f"ALTER TABLE outbox ADD COLUMN {column} {decl}")
        self.db.executemany("INSERT OR IGNORE INTO counters(name, value) VALUES (?, 0)", [(c,) for c in COUNTERS])
        rows, size = self.db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM held").fetchone()
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
        db = getattr(self, "db", None)
        if db is not None:
            db.close()

    def _move_aside(self, reason: str) -> None:
        self.lost_pending = _count_pending(self.path)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        try:
            for suffix in ("", "-journal", "-wal", "-shm"):
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

    # --- the lock and the file's identity -----------------------------------------------------

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

    def close(self) -> None:
        """Close the database and release the lock."""
        try:
            self.db.close()
        finally:
            self._release_file_lock()

    # --- the journal's room -------------------------------------------------------------------

    @property
    def journal_path(self) -> Path:
        """The rollback journal beside the outbox file (kept at JOURNAL_RESERVE bytes)."""
        return Path(str(self.path) + "-journal")

    def keep_journal_reserve(self) -> None:
        """Grow the journal back to JOURNAL_RESERVE bytes (warned once while that fails)."""
        # Only ever called between transactions: SQLite zeroes a persistent journal's header when a
        # transaction ends, and a journal whose first byte is zero is no hot journal, so the zeros
        # written here are room for the next transaction, never something SQLite would play back.
        path = self.journal_path
        try:
            have = path.stat().st_size
        except FileNotFoundError:
            have = -1
        except OSError:
            return  # the next write reports what is wrong with the folder
        if have >= JOURNAL_RESERVE:
            return
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, os.stat(self.path).st_mode & 0o666)
            try:
                have = os.fstat(fd).st_size
                while have < JOURNAL_RESERVE:
                    have += os.pwrite(fd, bytes(JOURNAL_RESERVE - have), have)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            if not self._journal_warned:
                self._journal_warned = True
                log.warning(
                    "outbox %s: cannot keep %d KiB of journal room in %s (%s); removing sent hits may fail "
                    "while its disk stays full",
                    self.path,
                    JOURNAL_RESERVE // 1024,
                    path,
                    e.strerror or e,
                )
            return
        if self._journal_warned:
            self._journal_warned = False
            log.info("outbox %s: journal room of %d KiB kept again", self.path, JOURNAL_RESERVE // 1024)

    # --- writes and their problems ------------------------------------------------------------

    def set_problem(self, kind: str, text: str) -> None:
        """Note (and log once) what keeps the file from being written: `kind` 'full' or 'write'."""
        if text != self.problem:
            log.error("%s", text)
        self.problem, self._problem_kind = text, kind

    def wrote(self, *, stored_plainly: bool) -> None:
        """After a commit: a write problem is over; a full disk is over once a hit was stored without
        making room for it and the disk has room again. Keeps the journal's reserve."""
        if self.problem is not None and (self._problem_kind == "write" or (stored_plainly and self._disk_has_room())):
            log.info("outbox %s writes again (was: %s)", self.path, self.problem)
            self.problem = None
        self.keep_journal_reserve()

    def _disk_has_room(self) -> bool:
        # Hits also fit in pages freed inside the file while the disk stays full; the warning stays
        # until the disk itself has room, or it would come and go with every other hit.
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize >= JOURNAL_RESERVE

    def failed(self, what: str, e: sqlite3.Error) -> OutboxError:
        """The error to raise for a write that failed (`what` was being done), noted as the problem."""
        if is_full(e):
            hint = "its disk is full even for deletes: free space on it"
        else:
            hint = "check the disk and that the file and its folder are writable (ls -l; lsattr for the immutable flag)"
        self.set_problem("write", f"outbox {self.path}: cannot write ({e}); {hint}")
        return OutboxError(f"outbox {self.path}: {what}: {e}; {hint}")

    def rollback(self) -> None:
        """Roll back the open transaction, if any."""
        try:
            self.db.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    # --- counters and rows --------------------------------------------------------------------

    def bump(self, bumps: dict[str, int]) -> None:
        """Add to the counters, inside the caller's transaction."""
        self.db.executemany(
            "UPDATE counters SET value = value + ? WHERE name = ?", [(n, name) for name, n in bumps.items() if n]
        )

    def counters(self) -> dict[str, int]:
        """Every counter's total since the file was created."""
        return {name: int(v) for name, v in self.db.execute("SELECT name, value FROM counters")}

    def latest_refusal(self) -> str:
        """The latest hit the centre refused, with its reason ("" when none is kept)."""
        row = self.db.execute(
            "SELECT hit_id, reason, error FROM outbox WHERE state = ? ORDER BY seq DESC LIMIT 1", (QUARANTINED,)
        ).fetchone()
        if row is None:
            return ""
        return f"hit {row[0]}: {row[1]}: {row[2]}"


class _Corrupt(sqlite3.DatabaseError):
    """SQLite's integrity check found damage."""


_SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_NOTADB = 11, 13, 26


def _is_corruption(e: sqlite3.Error) -> bool:
    # Only damage moves a file aside; "cannot open" (permissions, a folder) is the user's to fix.
    code = getattr(e, "sqlite_errorcode", None)
    return isinstance(e, _Corrupt) or (code is not None and code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB))


def is_full(e: sqlite3.Error) -> bool:
    """SQLITE_FULL: the disk (ENOSPC) had no room for the write."""
    code = getattr(e, "sqlite_errorcode", None)
    return code is not None and code & 0xFF == _SQLITE_FULL


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
