"""The durable outbox: hits wait here, on disk, until the centre has answered them.

SQLite with a persistent rollback journal and synchronous=FULL: once `put` returns, the hit survives a
kill -9 and a power cut. A row is *pending* until the broker acknowledges it (`ack`, its PUBACK), then
*awaiting* the verdict of the centre's receiver (`apply_verdicts`): 'stored' or 'duplicate' deletes
it, 'refused' keeps it as *quarantined* with the centre's reason (at most `quarantine_max` of them).
A PUBACK only says the broker holds the hit; a receiver can still refuse it (an unsigned hit from a
unit with a registered key), and before verdicts such a hit was deleted here and seen nowhere.

An awaiting row is sent again when no verdict came within `verdict_timeout_s` (doubling with each
resend, up to `_RESEND_BACKOFF_MAX` times that): a verdict can be lost (a receiver killed between its
commit and its verdict), and the receiver answers a hit it holds 'duplicate'. With `verdicts = "auto"`
(the default) and no verdict ever received by this outbox, an awaiting row is deleted instead after
`verdict_timeout_s` (counted `unconfirmed`): the receivers are older than verdicts, and the unit
behaves as before them; the first verdict switches the outbox to waiting for verdicts for good.
`verdicts = "off"` deletes on PUBACK, `"require"` always waits.

The outbox is bounded by `max_bytes` of stored hit data (all three states) and by the room on its
disk; when a new hit does not fit in either, rows go in this order: hits awaiting a verdict (the
broker acknowledged them, which was all a unit had before verdicts), quarantined hits, the crops of
the oldest pending hits, the new hit's own crop, pending hit records last. Every drop is counted
(persistently, in the same transaction) and logged, so nothing disappears silently.

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
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from common.config import StrictModel
from wire.records import OUTBOX_COUNTERS, OUTBOX_VERDICT_COUNTERS, Verdict

log = logging.getLogger(__name__)

COUNTERS = (*OUTBOX_COUNTERS, *OUTBOX_VERDICT_COUNTERS)
# Row states. 0 -> 1 (the broker's PUBACK) changes no row's size: SQLite stores the integers 0 and 1
# in the record header alone, so marking hits sent needs no new page on a full disk.
PENDING, AWAITING, QUARANTINED = 0, 1, 2
STATE_NAMES = {PENDING: "pending", AWAITING: "awaiting_verdict", QUARANTINED: "quarantined"}
# An awaiting hit is re-sent after verdict_timeout_s, then twice that, ... at most this many times it.
_RESEND_BACKOFF_MAX = 16
MIN_MAX_BYTES = 64 * 1024
# Room kept in the rollback journal for the next transaction: a delete of a window of acknowledged
# hits or a drop of old crops changes a few dozen 4 KiB pages at most (freed pages are not copied).
JOURNAL_RESERVE = 512 * 1024
# Acknowledged hits deleted per transaction, so one delete's journal stays inside JOURNAL_RESERVE.
_ACK_CHUNK = 16
# Room asked for beyond a new hit's own bytes when the disk is full: its row may need a new table
# and index page besides the pages of its crop.
_FULL_DISK_SLACK = 4 * 4096


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

    verdicts: Literal["auto", "require", "off"] = Field(
        default="auto",
        description="keep a sent hit until the centre's verdict: auto (until a verdict ever came, delete "
        "verdict_timeout_s after the broker's PUBACK, for receivers older than verdicts), require, or off "
        "(delete on PUBACK)",
    )
    verdict_timeout_s: float = Field(
        default=300.0,
        ge=0.05,
        le=86400,
        description="a hit without a verdict this long after the broker's PUBACK is sent again (the wait "
        "doubles with each resend, up to 16 times this); the receiver answers a hit it holds 'duplicate'",
    )
    quarantine_max: int = Field(
        default=1000,
        ge=0,
        description="hits the centre refused kept with their reason; beyond this the oldest go (counted)",
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
    """One hit: the record (JSON bytes, without crop), its crop, why a crop is missing, its state
    (a STATE_NAMES value) and, when the centre refused it, the reason word and the centre's sentence."""

    seq: int
    hit_id: str
    queued_at: float
    record: bytes
    crop: bytes | None
    crop_dropped: str | None
    state: str = "pending"
    reason: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class VerdictOutcome:
    """What `apply_verdicts` did: hits deleted (stored or duplicate), hits kept as quarantined, and
    verdicts ignored (about hits this outbox does not hold, or already refused)."""

    deleted: int = 0
    quarantined: int = 0
    ignored: int = 0


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
"""


class Outbox:
    """A bounded, crash-safe FIFO of hits, shared by one producer and one publisher thread.

    `take` hands out the next rows to publish (pending ones, then awaiting ones whose verdict is
    overdue) and remembers them as in flight (they are never chosen for dropping: the transport
    already holds them); `ack` marks rows the broker acknowledged as awaiting their verdict (deletes
    them with `verdicts = "off"`; a row whose write failed stays acknowledged and is written by the
    next `ack`); `apply_verdicts` deletes or quarantines rows by the centre's verdicts; `expire`
    deletes overdue awaiting rows while the receivers send no verdicts (`verdicts = "auto"`);
    `release` puts in-flight rows back to be taken again. `problem` says what keeps the outbox from
    working as it should (a full disk, a file it cannot write), None while all is well; `refusal`
    what the centre refused, while refused hits are kept.
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
        self.problem: str | None = None
        self._problem_kind = ""  # 'full' (the disk had no room) or 'write' (a write failed otherwise)
        self._journal_warned = False
        try:
            rows, size = self._open_or_replace()
            self._identity = self._file_identity()
        except BaseException:
            self._release_file_lock()
            raise
        self._lock = threading.Lock()
        self._rows = int(rows)
        self._bytes = int(size)
        self._inflight: set[int] = set()  # handed out by take, not yet acknowledged
        self._acked: set[int] = set()  # acknowledged, their state change (or delete) not yet committed
        # Awaiting a verdict: when it is overdue (monotonic) and how often it was sent again. Those from
        # before a restart get a full timeout from now: the verdict may be waiting at the broker.
        now = time.monotonic()
        self._awaiting: dict[int, tuple[float, int]] = {
            int(seq): (now + config.verdict_timeout_s, 0)
            for (seq,) in self._db.execute("SELECT seq FROM outbox WHERE state = ?", (AWAITING,))
        }
        self._resending: set[int] = set()  # awaiting rows handed out again by take
        self._quarantined = int(
            self._db.execute("SELECT COUNT(*) FROM outbox WHERE state = ?", (QUARANTINED,)).fetchone()[0]
        )
        self._last_refusal = self._latest_refusal()
        seen = self._db.execute(
            "SELECT COALESCE(SUM(value), 0) FROM counters WHERE name IN ('verdicts_stored', 'verdicts_duplicate', 'quarantined')"
        ).fetchone()[0]
        self.verdict_seen = int(seen) > 0
        self._unconfirmed_warned = False
        self._cursor = 0
        self._closed = False
        self.gone: str | None = None  # why the outbox stopped accepting hits (file deleted or replaced)
        self._keep_journal_reserve()
        if rows:
            log.info(
                "outbox %s: %d hits (%d bytes) from before: %d to send first, %d awaiting the centre's verdict, "
                "%d refused by the centre",
                self.path,
                rows,
                size,
                rows - len(self._awaiting) - self._quarantined,
                len(self._awaiting),
                self._quarantined,
            )

    def _connect(self) -> tuple[int, int]:
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=10)
        # No memory-mapped I/O: a write to a mapped page of a file that became unwritable is a SIGBUS.
        self._db.execute("PRAGMA mmap_size=0")
        mode = self._db.execute("PRAGMA journal_mode=PERSIST").fetchone()[0]
        if str(mode).lower() != "persist":
            raise OutboxError(
                f"outbox.path: {self.path} cannot switch to a rollback journal (still {mode}): an older unit's "
                "WAL could not be folded into the file; free space on its disk and restart the unit"
            )
        self._db.execute("PRAGMA synchronous=FULL")
        # The journal never shrinks below what it holds in reserve, nor stays larger.
        self._db.execute(f"PRAGMA journal_size_limit={JOURNAL_RESERVE}")
        # Freed pages are not overwritten with zeros (Debian builds SQLite with secure_delete on): zeroing
        # copies every freed page into the journal, so dropping a crop would need as much room as the crop.
        self._db.execute("PRAGMA secure_delete=FAST")
        problems = [r[0] for r in self._db.execute("PRAGMA quick_check(5)").fetchall()]
        if problems != ["ok"]:
            raise _Corrupt("; ".join(str(p) for p in problems))
        self._db.executescript(_SCHEMA)
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(outbox)")}
        # An outbox from before verdicts: its rows are all pending. Adding a column rewrites no row.
        for column, decl in (("state", "INTEGER NOT NULL DEFAULT 0"), ("reason", "TEXT"), ("error", "TEXT")):
            if column not in columns:
                self._db.execute(f"ALTER TABLE outbox ADD COLUMN {column} {decl}")
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

    @property
    def journal_path(self) -> Path:
        """The rollback journal beside the outbox file (kept at JOURNAL_RESERVE bytes)."""
        return Path(str(self.path) + "-journal")

    def _release_file_lock(self) -> None:
        fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        os.close(self._lock_file)

    def _keep_journal_reserve(self) -> None:
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

    # --- problems -----------------------------------------------------------------------------

    def _set_problem(self, kind: str, text: str) -> None:
        if text != self.problem:
            log.error("%s", text)
        self.problem, self._problem_kind = text, kind

    def _wrote(self, *, stored_plainly: bool) -> None:
        """After a commit: a write problem is over; a full disk is over once a hit was stored without
        making room for it and the disk has room again. Keeps the journal's reserve."""
        if self.problem is not None and (self._problem_kind == "write" or (stored_plainly and self._disk_has_room())):
            log.info("outbox %s writes again (was: %s)", self.path, self.problem)
            self.problem = None
        self._keep_journal_reserve()

    def _disk_has_room(self) -> bool:
        # Hits also fit in pages freed inside the file while the disk stays full; the warning stays
        # until the disk itself has room, or it would come and go with every other hit.
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize >= JOURNAL_RESERVE

    def _failed(self, what: str, e: sqlite3.Error) -> OutboxError:
        if _is_full(e):
            hint = "its disk is full even for deletes: free space on it"
        else:
            hint = "check the disk and that the file and its folder are writable (ls -l; lsattr for the immutable flag)"
        self._set_problem("write", f"outbox {self.path}: cannot write ({e}); {hint}")
        return OutboxError(f"outbox {self.path}: {what}: {e}; {hint}")

    # --- producer side ------------------------------------------------------------------------

    def put(self, hit_id: str, record: bytes, crop: bytes | None, queued_at: float | None = None) -> int | None:
        """Store one hit durably; returns its sequence number (the existing one if the hit is already
        pending), or None if it was dropped for lack of room (only when every other pending hit is
        in flight). A crop larger than `max_crop_bytes` is dropped here and counted. When the hit does
        not fit in `max_bytes` or on the disk, older crops and then older hits make room (counted).
        Raises OutboxError if the disk write fails otherwise."""
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
            hit = _NewHit(hit_id, queued_at, record, crop, crop_dropped, bumps)
            try:
                try:
                    seq = self._insert(hit)
                    plainly = True
                except sqlite3.Error as e:
                    self._rollback()
                    if not _is_full(e):
                        raise
                    seq = self._insert_on_full_disk(hit, e)
                    plainly = False
            except sqlite3.Error as e:
                self._rollback()
                raise self._failed(f"cannot store hit {hit_id}", e) from None
            self._wrote(stored_plainly=plainly)
            return seq

    def _insert(self, hit: _NewHit) -> int | None:
        """One transaction: make room within max_bytes (hits awaiting a verdict, quarantined hits,
        oldest crops, the hit's own crop, oldest records), insert the hit, count. Accounts and logs
        only once it committed."""
        crop, crop_dropped, bumps = hit.crop, hit.crop_dropped, dict(hit.bumps)
        size = len(hit.record) + (len(crop) if crop else 0)
        self._db.execute("BEGIN IMMEDIATE")
        already = self._db.execute("SELECT seq FROM outbox WHERE hit_id = ?", (hit.hit_id,)).fetchone()
        if already:
            self._db.execute("ROLLBACK")
            log.debug("hit %s is already in the outbox; not stored twice", hit.hit_id)
            return int(already[0])
        drops = _Drops()
        own_crop = 0
        excess = self._bytes + size - self.config.max_bytes
        for state in (AWAITING, QUARANTINED):
            if excess > 0:
                excess = self._drop_rows(excess, drops, state)
        if excess > 0:
            excess = self._drop_crops(excess, drops)
            if excess > 0 and crop:
                own_crop = len(crop)
                excess -= own_crop
                size -= own_crop
                crop, crop_dropped = None, "outbox_full"
                bumps["crops_dropped_full"] = bumps.get("crops_dropped_full", 0) + 1
            if excess > 0:
                excess = self._drop_records(excess, drops)
        seq = None
        if excess > 0:
            bumps["hits_dropped_full"] = bumps.get("hits_dropped_full", 0) + 1
            del bumps["accepted"]
            size = 0
        else:
            seq = self._db.execute(
                "INSERT INTO outbox(hit_id, queued_at, record, crop, crop_dropped, size) VALUES (?,?,?,?,?,?)",
                (hit.hit_id, hit.queued_at, hit.record, crop, crop_dropped, size),
            ).lastrowid
        self._bump(drops.counts(bumps))
        self._db.execute("COMMIT")
        self._dropped(drops, "outbox full (outbox.max_bytes)")
        if own_crop:
            log.warning("outbox full: dropped the face crop of new hit %s (%d bytes)", hit.hit_id, own_crop)
        if seq is None:
            log.error(
                "outbox full and every pending hit is in flight: dropped new hit %s (raise outbox.max_bytes)",
                hit.hit_id,
            )
            return None
        self._rows += 1
        self._bytes += size
        return int(seq)

    def _insert_on_full_disk(self, hit: _NewHit, error: sqlite3.Error) -> int | None:
        """The disk has no room for the hit: free pages inside the file, by the same policy as for
        max_bytes (hits already acknowledged and awaiting a verdict first, then quarantined hits, the
        oldest crops, the hit's own crop, the oldest records), each step committed on its own, until
        the insert fits."""
        self._set_problem(
            "full",
            f"outbox {self.path}: its disk is full ({error}); a new hit that does not fit makes room by dropping "
            "the oldest face crops, then the oldest hits: free space on that disk or give outbox.path a larger one",
        )
        try:
            # Only a delete frees room; marking hits as awaiting their verdict frees none.
            retry = self._apply_acked() > 0 and self.config.verdicts == "off"
        except sqlite3.Error:
            self._rollback()  # the drops below may still fit in the journal's room
            retry = False
        need = len(hit.record) + len(hit.crop or b"") + _FULL_DISK_SLACK
        while True:
            if retry:
                try:
                    return self._insert(hit)
                except sqlite3.Error as e:
                    self._rollback()
                    if not _is_full(e):
                        raise
            retry = True
            if (
                self._free_room(need, "awaiting")
                or self._free_room(need, "quarantined")
                or self._free_room(need, "crops")
                or (hit.crop is None and self._free_room(need, "records"))
            ):
                need *= 2
            elif hit.crop is not None:
                log.warning("disk full: dropping the face crop of new hit %s (%d bytes)", hit.hit_id, len(hit.crop))
                bumps = dict(hit.bumps, crops_dropped_full=hit.bumps.get("crops_dropped_full", 0) + 1)
                hit = _NewHit(hit.hit_id, hit.queued_at, hit.record, None, "outbox_full", bumps)
            else:
                break
        # Nothing left to drop: every other pending hit is in flight.
        self._db.execute("BEGIN IMMEDIATE")
        self._bump({"hits_dropped_full": 1, **{k: n for k, n in hit.bumps.items() if k != "accepted"}})
        self._db.execute("COMMIT")
        log.error("disk full and every pending hit is in flight: dropped new hit %s", hit.hit_id)
        return None

    def _free_room(self, need: int, what: str) -> bool:
        """Drop the oldest hits awaiting a verdict, quarantined hits, crops or pending records (`what`)
        worth `need` bytes in a transaction of their own; False if there was nothing to drop."""
        drops = _Drops()
        self._db.execute("BEGIN IMMEDIATE")
        if what == "crops":
            self._drop_crops(need, drops)
        elif what == "records":
            self._drop_records(need, drops)
        else:
            self._drop_rows(need, drops, AWAITING if what == "awaiting" else QUARANTINED)
        if not drops.any():
            self._db.execute("ROLLBACK")
            return False
        self._bump(drops.counts({}))
        self._db.execute("COMMIT")
        self._dropped(drops, "disk full")
        return True

    def _busy(self) -> set[int]:
        # Rows the transport holds or that were sent: never dropped, never handed out again.
        return self._inflight | self._acked

    def _drop_crops(self, excess: int, drops: _Drops) -> int:
        busy = self._busy()
        rows = self._db.execute(
            "SELECT seq, hit_id, length(crop) FROM outbox WHERE crop IS NOT NULL AND state = ? ORDER BY seq", (PENDING,)
        )
        for seq, hit_id, n in rows:
            if excess <= 0:
                break
            if seq in busy:
                continue
            drops.crops.append((seq, hit_id, n))
            excess -= n
        for seq, _, n in drops.crops:
            self._db.execute(
                "UPDATE outbox SET crop = NULL, crop_dropped = 'outbox_full', size = size - ? WHERE seq = ?", (n, seq)
            )
        return excess

    def _drop_records(self, excess: int, drops: _Drops) -> int:
        busy = self._busy()
        for seq, hit_id, n in self._db.execute(
            "SELECT seq, hit_id, size FROM outbox WHERE state = ? ORDER BY seq", (PENDING,)
        ):
            if excess <= 0:
                break
            if seq in busy:
                continue
            drops.records.append((seq, hit_id, n))
            excess -= n
        for seq, _, _ in drops.records:
            self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
        return excess

    def _drop_rows(self, excess: int, drops: _Drops, state: int) -> int:
        """Whole rows of `state` (AWAITING or QUARANTINED), oldest first, worth `excess` bytes."""
        busy = self._busy()
        chosen = drops.awaiting if state == AWAITING else drops.quarantined
        for seq, hit_id, n in self._db.execute(
            "SELECT seq, hit_id, size FROM outbox WHERE state = ? ORDER BY seq", (state,)
        ):
            if excess <= 0:
                break
            if seq in busy:
                continue
            chosen.append((seq, hit_id, n))
            excess -= n
        for seq, _, _ in chosen:
            self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
        return excess

    def _dropped(self, drops: _Drops, why: str) -> None:
        """Account for and log drops that committed."""
        for _, hit_id, n in drops.crops:
            log.warning("%s: dropped the face crop of pending hit %s (%d bytes)", why, hit_id, n)
            self._bytes -= n
        for _, hit_id, n in drops.records:
            log.error("%s: dropped pending hit %s entirely", why, hit_id)
            self._bytes -= n
        for seq, hit_id, n in drops.awaiting:
            log.warning(
                "%s: dropped hit %s awaiting the centre's verdict (the broker had acknowledged it)", why, hit_id
            )
            self._bytes -= n
            self._awaiting.pop(seq, None)
        for _, hit_id, n in drops.quarantined:
            log.warning("%s: dropped hit %s that the centre had refused (kept for inspection until now)", why, hit_id)
            self._bytes -= n
        self._quarantined -= len(drops.quarantined)
        self._rows -= len(drops.records) + len(drops.awaiting) + len(drops.quarantined)
        if drops.quarantined:
            self._last_refusal = self._latest_refusal()

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
        """The next `limit` rows to publish, marked in flight: pending rows in order, then hits
        awaiting a verdict that is overdue (while verdicts are expected; see `expects_verdicts`)."""
        if limit <= 0:
            return []
        with self._lock:
            self._check_open()
            busy = self._busy()
            rows = self._db.execute(
                "SELECT seq, hit_id, queued_at, record, crop, crop_dropped FROM outbox WHERE seq > ? AND state = ? "
                "ORDER BY seq LIMIT ?",
                (self._cursor, PENDING, limit + len(busy)),
            ).fetchall()
            out = []
            for seq, hit_id, queued_at, record, crop, dropped in rows:
                if seq in busy:
                    continue
                out.append(OutboxRow(seq, hit_id, queued_at, bytes(record), bytes(crop) if crop else None, dropped))
                self._inflight.add(seq)
                if len(out) == limit:
                    break
            if out:
                self._cursor = max(self._cursor, out[-1].seq)
            if len(out) < limit and self.expects_verdicts:
                out += self._take_overdue(limit - len(out), busy)
            return out

    def _take_overdue(self, limit: int, busy: set[int]) -> list[OutboxRow]:
        now = time.monotonic()
        due = sorted(seq for seq, (at, _) in self._awaiting.items() if at <= now and seq not in busy)[:limit]
        if not due:
            return []
        marks = ",".join("?" * len(due))
        out = []
        for seq, hit_id, queued_at, record, crop, dropped in self._db.execute(
            "SELECT seq, hit_id, queued_at, record, crop, crop_dropped FROM outbox "
            f"WHERE seq IN ({marks}) AND state = ? ORDER BY seq",
            (*due, AWAITING),
        ):
            out.append(
                OutboxRow(
                    seq, hit_id, queued_at, bytes(record), bytes(crop) if crop else None, dropped, "awaiting_verdict"
                )
            )
            self._inflight.add(seq)
            self._resending.add(seq)
        log.info(
            "outbox %s: no verdict from the centre on %d hits within their wait; sending them again "
            "(a receiver that holds one answers 'duplicate')",
            self.path,
            len(out),
        )
        return out

    @property
    def expects_verdicts(self) -> bool:
        """Whether a hit the broker acknowledged waits for the centre's verdict (and is sent again
        without one): `verdicts = "require"`, or "auto" once any verdict came."""
        mode = self.config.verdicts
        return mode == "require" or (mode == "auto" and self.verdict_seen)

    def ack(self, seqs: list[int]) -> int:
        """Mark the rows the broker acknowledged as awaiting their verdict (delete them with
        `verdicts = "off"`), and those acknowledged before whose write failed; returns how many
        pending rows changed (a hit sent again is not counted twice). The rows leave the in-flight set at once and are not handed out again until their
        verdict is overdue; if the write fails (OutboxError), they stay acknowledged and the next
        `ack`, with new rows or none, writes them."""
        with self._lock:
            self._acked.update(seqs)
            self._inflight.difference_update(seqs)
            if not self._acked:
                return 0
            self._check_writable()
            try:
                done = self._apply_acked()
            except sqlite3.Error as e:
                self._rollback()
                raise self._failed(f"cannot mark {len(self._acked)} acknowledged hits (kept, retried)", e) from None
            self._wrote(stored_plainly=False)
            return done

    def _apply_acked(self) -> int:
        """Write the acknowledged rows, a few per transaction (each one's journal fits the reserve):
        pending ones become awaiting (or are deleted, `verdicts = "off"`), awaiting ones sent again get
        a longer wait; returns how many pending rows changed. Rows of a transaction that failed stay
        acknowledged. A row deleted or quarantined by its verdict meanwhile is left alone."""
        changed = 0
        pending = sorted(self._acked)
        delete = self.config.verdicts == "off"
        timeout = self.config.verdict_timeout_s
        for i in range(0, len(pending), _ACK_CHUNK):
            chunk = pending[i : i + _ACK_CHUNK]
            marks = ",".join("?" * len(chunk))
            self._db.execute("BEGIN IMMEDIATE")
            found = self._db.execute(f"SELECT seq, state, size FROM outbox WHERE seq IN ({marks})", chunk).fetchall()
            fresh = [(seq, size) for seq, state, size in found if state == PENDING]
            again = [seq for seq, state, _ in found if state == AWAITING]
            fresh_marks = ",".join("?" * len(fresh))
            if fresh and delete:
                self._db.execute(f"DELETE FROM outbox WHERE seq IN ({fresh_marks})", [s for s, _ in fresh])
            elif fresh:
                self._db.execute(
                    f"UPDATE outbox SET state = ? WHERE seq IN ({fresh_marks})", (AWAITING, *[s for s, _ in fresh])
                )
            self._bump({"sent": len(fresh), "resent": len(again), "unconfirmed": len(fresh) if delete else 0})
            self._db.execute("COMMIT")
            self._acked.difference_update(chunk)
            self._resending.difference_update(chunk)
            now = time.monotonic()
            if delete:
                self._rows -= len(fresh)
                self._bytes -= sum(size for _, size in fresh)
            else:
                for seq, _ in fresh:
                    self._awaiting[seq] = (now + timeout, 0)
            for seq in again:
                tries = self._awaiting.get(seq, (0.0, 0))[1] + 1
                self._awaiting[seq] = (now + timeout * min(2**tries, _RESEND_BACKOFF_MAX), tries)
            changed += len(fresh)
        return changed

    def apply_verdicts(self, verdicts: list[Verdict]) -> VerdictOutcome:
        """Apply the centre's verdicts: 'stored' and 'duplicate' delete the hit, 'refused' keeps it as
        quarantined with the reason (logged at ERROR; beyond `quarantine_max` the oldest go). A
        verdict about a hit this outbox does not hold (answered before, or never this unit's) is
        ignored and counted. Raises OutboxError if the disk write fails (the hits stay as they were and
        are sent again when their verdict is overdue)."""
        if not verdicts:
            return VerdictOutcome()
        with self._lock:
            self._check_writable()
            try:
                outcome, refused = self._apply_verdicts(verdicts)
            except sqlite3.Error as e:
                self._rollback()
                raise self._failed(f"cannot apply {len(verdicts)} verdicts of the centre (hits kept)", e) from None
            self._wrote(stored_plainly=False)
        for hit_id, reason, error in refused:
            log.error(
                "the centre refused hit %s: %s (%s); kept in the outbox with that reason, not sent again "
                "(%d refused hits kept)",
                hit_id,
                reason,
                error,
                self._quarantined,
            )
        return outcome

    def _apply_verdicts(self, verdicts: list[Verdict]) -> tuple[VerdictOutcome, list[tuple[str, str, str]]]:
        by_id: dict[str, Verdict] = {}
        for v in verdicts:
            by_id[v.hit_id] = v  # the last word on a hit counts, as the receiver said it last
        ids = list(by_id)
        rows: list[tuple[int, str, int, int]] = []
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            rows += self._db.execute(
                f"SELECT seq, hit_id, state, size FROM outbox WHERE hit_id IN ({','.join('?' * len(part))})", part
            ).fetchall()
        held = {hit_id: (seq, state, size) for seq, hit_id, state, size in rows}
        bumps: dict[str, int] = {}
        deleted: list[tuple[int, int, int]] = []
        refused: list[tuple[int, int, Verdict]] = []
        ignored = len(verdicts) - len(by_id)
        for hit_id, v in by_id.items():
            row = held.get(hit_id)
            if row is None or row[1] == QUARANTINED:
                ignored += 1
                continue
            seq, state, size = row
            if state == PENDING:
                bumps["sent"] = bumps.get("sent", 0) + 1  # its PUBACK is not processed yet, or was lost
            if v.outcome == "refused":
                refused.append((seq, state, v))
            else:
                deleted.append((seq, state, size))
                key = "verdicts_stored" if v.outcome == "stored" else "verdicts_duplicate"
                bumps[key] = bumps.get(key, 0) + 1
        bumps["quarantined"] = len(refused)
        bumps["verdicts_ignored"] = ignored
        self._db.execute("BEGIN IMMEDIATE")
        for i in range(0, len(deleted), 500):
            part = [seq for seq, _, _ in deleted[i : i + 500]]
            self._db.execute(f"DELETE FROM outbox WHERE seq IN ({','.join('?' * len(part))})", part)
        for seq, _, v in refused:
            self._db.execute(
                "UPDATE outbox SET state = ?, reason = ?, error = ? WHERE seq = ?",
                (QUARANTINED, v.reason, v.error, seq),
            )
        over = self._quarantined + len(refused) - self.config.quarantine_max
        dropped: list[tuple[int, str, int]] = []
        if over > 0:
            dropped = [
                (int(seq), hit_id, int(size))
                for seq, hit_id, size in self._db.execute(
                    "SELECT seq, hit_id, size FROM outbox WHERE state = ? ORDER BY seq LIMIT ?", (QUARANTINED, over)
                )
            ]
            self._db.executemany("DELETE FROM outbox WHERE seq = ?", [(seq,) for seq, _, _ in dropped])
            bumps["quarantined_dropped"] = len(dropped)
        self._bump(bumps)
        self._db.execute("COMMIT")
        # Accounted only once it committed.
        self.verdict_seen = self.verdict_seen or len(by_id) > ignored or bool(refused)
        for seq, _, size in deleted:
            self._forget(seq)
            self._rows -= 1
            self._bytes -= size
        for seq, _, _ in refused:
            self._forget(seq)
        self._quarantined += len(refused)
        for _, hit_id, size in dropped:
            log.warning(
                "outbox %s: dropped hit %s that the centre had refused, to keep at most %d (outbox.quarantine_max)",
                self.path,
                hit_id,
                self.config.quarantine_max,
            )
            self._rows -= 1
            self._bytes -= size
        self._quarantined -= len(dropped)
        if refused or dropped:
            self._last_refusal = self._latest_refusal()
        outcome = VerdictOutcome(deleted=len(deleted), quarantined=len(refused), ignored=ignored)
        return outcome, [(v.hit_id, v.reason or "?", v.error or "") for _, _, v in refused]

    def _forget(self, seq: int) -> None:
        """A row that left the awaiting state by its verdict: neither in flight nor overdue any more."""
        self._awaiting.pop(seq, None)
        self._inflight.discard(seq)
        self._acked.discard(seq)
        self._resending.discard(seq)

    def count_ignored(self, n: int) -> None:
        """Count `n` verdict messages ignored before they reached the outbox (malformed, another
        unit's, or no room to queue them)."""
        if n <= 0:
            return
        with self._lock:
            self._check_writable()
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._bump({"verdicts_ignored": n})
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                self._rollback()
                raise self._failed(f"cannot count {n} ignored verdict messages", e) from None

    def expire(self) -> int:
        """With `verdicts = "auto"` and no verdict ever received, delete the hits that awaited one for
        `verdict_timeout_s` (counted `unconfirmed`: the broker's PUBACK was all they got, as before
        verdicts) and warn once; returns how many went. Nothing expires once verdicts are expected."""
        if self.config.verdicts != "auto" or self.verdict_seen:
            return 0
        with self._lock:
            now = time.monotonic()
            busy = self._busy()
            due = sorted(seq for seq, (at, _) in self._awaiting.items() if at <= now and seq not in busy)
            if not due:
                return 0
            self._check_writable()
            gone = 0
            try:
                for i in range(0, len(due), _ACK_CHUNK):
                    chunk = due[i : i + _ACK_CHUNK]
                    marks = ",".join("?" * len(chunk))
                    self._db.execute("BEGIN IMMEDIATE")
                    n, size = self._db.execute(
                        f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM outbox WHERE seq IN ({marks}) AND state = ?",
                        (*chunk, AWAITING),
                    ).fetchone()
                    self._db.execute(f"DELETE FROM outbox WHERE seq IN ({marks}) AND state = ?", (*chunk, AWAITING))
                    self._bump({"unconfirmed": int(n)})
                    self._db.execute("COMMIT")
                    for seq in chunk:
                        self._awaiting.pop(seq, None)
                    self._rows -= int(n)
                    self._bytes -= int(size)
                    gone += int(n)
            except sqlite3.Error as e:
                self._rollback()
                raise self._failed(f"cannot delete {len(due)} hits that got no verdict", e) from None
            self._wrote(stored_plainly=False)
        if not self._unconfirmed_warned:
            self._unconfirmed_warned = True
            log.warning(
                "outbox %s: no verdict from the centre within %gs of the broker's PUBACK, and none ever: its "
                "receivers may be older than verdicts, so hits are deleted on the broker's PUBACK as before "
                "(counted 'unconfirmed'); the first verdict that comes makes the unit keep every hit until its "
                'verdict (outbox.verdicts = "require" does so from the start)',
                self.path,
                self.config.verdict_timeout_s,
            )
        return gone

    def release(self, seqs: list[int]) -> None:
        """Return in-flight rows to the queue so `take` hands them out again, oldest first."""
        with self._lock:
            seqs = [s for s in seqs if s in self._inflight]
            if seqs:
                self._inflight.difference_update(seqs)
                self._resending.difference_update(seqs)
                now = time.monotonic()
                for seq in seqs:
                    if seq in self._awaiting:
                        self._awaiting[seq] = (now, self._awaiting[seq][1])  # still overdue
                self._cursor = min(self._cursor, min(seqs) - 1)

    # --- figures ------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Every hit held: pending, awaiting a verdict and quarantined."""
        return self._rows

    @property
    def unsent(self) -> int:
        """Hits the broker has not acknowledged yet."""
        return self._rows - len(self._awaiting) - self._quarantined

    @property
    def awaiting(self) -> int:
        """Hits the broker acknowledged that wait for the centre's verdict."""
        return len(self._awaiting)

    @property
    def quarantined(self) -> int:
        """Hits the centre refused, kept with their reason."""
        return self._quarantined

    @property
    def pending_bytes(self) -> int:
        return self._bytes

    @property
    def inflight(self) -> int:
        """Rows handed out by `take` and not yet acknowledged."""
        return len(self._inflight)

    @property
    def refusal(self) -> str | None:
        """While refused hits are kept: how many, and the latest one's reason, for the unit's warnings."""
        if not self._quarantined:
            return None
        return (
            f"the centre refused {self._quarantined} hits (latest: {self._last_refusal}); they are kept in the "
            f"outbox {self.path} and not sent again: fix the cause (for 'unsigned': set [mqtt] signing_key to "
            "the key make-credentials made for this unit)"
        )

    def _latest_refusal(self) -> str:
        row = self._db.execute(
            "SELECT hit_id, reason, error FROM outbox WHERE state = ? ORDER BY seq DESC LIMIT 1", (QUARANTINED,)
        ).fetchone()
        if row is None:
            return ""
        return f"hit {row[0]}: {row[1]}: {row[2]}"

    def counters(self) -> dict[str, int]:
        """Totals since the outbox file was created: accepted, sent, each kind of drop, and the verdicts."""
        with self._lock:
            self._check_open()
            return {name: int(v) for name, v in self._db.execute("SELECT name, value FROM counters")}

    def stats(self) -> dict[str, int]:
        """As the heartbeat reports them: `pending`, hits not yet answered by the centre (unsent or
        awaiting a verdict; refused ones are `quarantined_kept`), `pending_bytes`, all stored hit data
        (what `max_bytes` bounds), and the counters."""
        out = {
            "pending": self._rows - self._quarantined,
            "pending_bytes": self._bytes,
            "max_bytes": self.config.max_bytes,
            "awaiting_verdict": self.awaiting,
            "quarantined_kept": self._quarantined,
        }
        out.update(self.counters())
        return out

    def rows(self) -> list[OutboxRow]:
        """Every row in order, with its state (for inspection and tests; the publisher uses `take`)."""
        with self._lock:
            self._check_open()
            return [
                OutboxRow(seq, h, q, bytes(r), bytes(c) if c else None, d, STATE_NAMES.get(st, str(st)), rs, er)
                for seq, h, q, r, c, d, st, rs, er in self._db.execute(
                    "SELECT seq, hit_id, queued_at, record, crop, crop_dropped, state, reason, error FROM outbox "
                    "ORDER BY seq"
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


@dataclass(frozen=True)
class _NewHit:
    """A hit on its way into the outbox, with the counters its storing bumps."""

    hit_id: str
    queued_at: float
    record: bytes
    crop: bytes | None
    crop_dropped: str | None
    bumps: dict[str, int]


@dataclass
class _Drops:
    """Rows chosen in one transaction to make room: (seq, hit id, bytes freed)."""

    crops: list[tuple[int, str, int]] = field(default_factory=list)
    records: list[tuple[int, str, int]] = field(default_factory=list)
    awaiting: list[tuple[int, str, int]] = field(default_factory=list)
    quarantined: list[tuple[int, str, int]] = field(default_factory=list)

    def any(self) -> bool:
        """Whether anything was chosen."""
        return bool(self.crops or self.records or self.awaiting or self.quarantined)

    def counts(self, bumps: dict[str, int]) -> dict[str, int]:
        """`bumps` with these drops added to their counters."""
        out = dict(bumps)
        out["crops_dropped_full"] = out.get("crops_dropped_full", 0) + len(self.crops)
        out["hits_dropped_full"] = out.get("hits_dropped_full", 0) + len(self.records)
        out["awaiting_dropped"] = out.get("awaiting_dropped", 0) + len(self.awaiting)
        out["quarantined_dropped"] = out.get("quarantined_dropped", 0) + len(self.quarantined)
        return out


class _Corrupt(sqlite3.DatabaseError):
    """SQLite's integrity check found damage."""


_SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_NOTADB = 11, 13, 26


def _is_corruption(e: sqlite3.Error) -> bool:
    # Only damage moves a file aside; "cannot open" (permissions, a folder) is the user's to fix.
    code = getattr(e, "sqlite_errorcode", None)
    return isinstance(e, _Corrupt) or (code is not None and code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB))


def _is_full(e: sqlite3.Error) -> bool:
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
