"""The Outbox: the producer's `put`, the publisher's `take`, `ack`, `release`, the verdicts, and the
figures, over one SQLite file (edge.outbox.file) under one lock."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from edge.outbox.config import OutboxConfig
from edge.outbox.file import AWAITING, PENDING, QUARANTINED, STATE_NAMES, OutboxError, OutboxFile, is_full
from edge.outbox.room import NewHit, Room
from edge.outbox.tally import Tally
from edge.outbox.verdicts import VerdictBook, VerdictOutcome
from wire.records import Verdict

log = logging.getLogger(__name__)

_ROW = "o.seq, o.hit_id, o.queued_at, o.record, o.crop, o.crop_dropped, c.frame, c.dropped"
"""The columns `_row` makes an OutboxRow of, from `_ROWS`."""
_ROWS = "outbox o LEFT JOIN contexts c ON c.seq = o.seq"


@dataclass(frozen=True)
class OutboxRow:
    """One hit: the record (JSON bytes, without crop), its crop, why a crop is missing, its state
    (a STATE_NAMES value), when the centre refused it the reason word and the centre's sentence, and
    its context frame or why the frame is missing (both None for a hit made without one)."""

    seq: int
    hit_id: str
    queued_at: float
    record: bytes
    crop: bytes | None
    crop_dropped: str | None
    state: str = "pending"
    reason: str | None = None
    error: str | None = None
    context: bytes | None = None
    context_dropped: str | None = None


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
        self._file = OutboxFile(self.path)
        self._db = self._file.db
        rows, size = self._file.held_at_open
        self._lock = threading.Lock()
        # Those awaiting a verdict from before a restart get a full timeout from now: the verdict may be
        # waiting at the broker.
        now = time.monotonic()
        awaiting = {
            int(seq): (now + config.verdict_timeout_s, 0)
            for (seq,) in self._db.execute("SELECT seq FROM outbox WHERE state = ?", (AWAITING,))
        }
        quarantined = int(self._db.execute("SELECT COUNT(*) FROM outbox WHERE state = ?", (QUARANTINED,)).fetchone()[0])
        last_refusal = self._file.latest_refusal()
        seen = self._db.execute(
            "SELECT COALESCE(SUM(value), 0) FROM counters WHERE name IN ('verdicts_stored', 'verdicts_duplicate', 'quarantined')"
        ).fetchone()[0]
        self._tally = Tally(rows, size, quarantined, awaiting, last_refusal, verdict_seen=int(seen) > 0)
        self._verdicts = VerdictBook(self._file, self._tally, config)
        self._room = Room(self._file, self._tally, config, self._verdicts.write_acked)
        self._cursor = 0
        self._closed = False
        self._file.keep_journal_reserve()
        if rows:
            log.info(
                "outbox %s: %d hits (%d bytes) from before: %d to send first, %d awaiting the centre's verdict, "
                "%d refused by the centre",
                self.path,
                rows,
                size,
                self._tally.unsent,
                len(awaiting),
                quarantined,
            )

    # --- the file -----------------------------------------------------------------------------

    @property
    def problem(self) -> str | None:
        """What keeps the outbox from writing (a full disk, a file it cannot write); None while all is well."""
        return self._file.problem

    @property
    def gone(self) -> str | None:
        """Why the outbox stopped accepting hits (its file deleted or replaced); None while it accepts them."""
        return self._file.gone

    @property
    def moved_aside(self) -> Path | None:
        """Where a corrupt file found at start was moved."""
        return self._file.moved_aside

    @property
    def lost_pending(self) -> int | None:
        """How many pending hits that corrupt file counted (None: unreadable)."""
        return self._file.lost_pending

    @property
    def journal_path(self) -> Path:
        """The rollback journal beside the outbox file (kept at JOURNAL_RESERVE bytes)."""
        return self._file.journal_path

    def check_present(self) -> None:
        """Raise OutboxGone if the file or lock file on disk is no longer the one this outbox holds."""
        self._file.check_present()

    def _check_open(self) -> None:
        if self._closed:
            raise OutboxError(f"outbox {self.path} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        self._file.check_present()

    # --- producer side ------------------------------------------------------------------------

    def put(
        self,
        hit_id: str,
        record: bytes,
        crop: bytes | None,
        queued_at: float | None = None,
        *,
        context: bytes | None = None,
    ) -> int | None:
        """Store one hit durably; returns its sequence number (the existing one if the hit is already
        pending), or None if it was dropped for lack of room (only when every other pending hit is
        in flight). A crop or context frame larger than `max_crop_bytes` is dropped here and counted.
        When the hit does not fit in `max_bytes` or on the disk, older context frames, then older
        crops, then older hits make room (counted). Raises OutboxError if the disk write fails otherwise."""
        queued_at = time.time() if queued_at is None else queued_at
        crop_dropped = context_dropped = None
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
            if context is not None and len(context) > self.config.max_crop_bytes:
                log.warning(
                    "hit %s: context frame of %d bytes is over outbox.max_crop_bytes (%d); sending the hit without it",
                    hit_id,
                    len(context),
                    self.config.max_crop_bytes,
                )
                context, context_dropped = None, "oversized"
                bumps["contexts_dropped_oversized"] = 1
            hit = NewHit(hit_id, queued_at, record, crop, crop_dropped, bumps, context, context_dropped)
            try:
                try:
                    seq = self._room.insert(hit)
                    plainly = True
                except sqlite3.Error as e:
                    self._file.rollback()
                    if not is_full(e):
                        raise
                    seq = self._room.insert_on_full_disk(hit, e)
                    plainly = False
            except sqlite3.Error as e:
                self._file.rollback()
                raise self._file.failed(f"cannot store hit {hit_id}", e) from None
            self._file.wrote(stored_plainly=plainly)
            return seq

    # --- publisher side -----------------------------------------------------------------------

    def take(self, limit: int) -> list[OutboxRow]:
        """The next `limit` rows to publish, marked in flight: pending rows in order, then hits
        awaiting a verdict that is overdue (while verdicts are expected; see `expects_verdicts`)."""
        if limit <= 0:
            return []
        with self._lock:
            self._check_open()
            busy = self._tally.busy()
            rows = self._db.execute(
                f"SELECT {_ROW} FROM {_ROWS} WHERE o.seq > ? AND o.state = ? ORDER BY o.seq LIMIT ?",
                (self._cursor, PENDING, limit + len(busy)),
            ).fetchall()
            out = []
            for row in rows:
                if row[0] in busy:
                    continue
                out.append(_row(row, "pending"))
                self._tally.inflight.add(row[0])
                if len(out) == limit:
                    break
            if out:
                self._cursor = max(self._cursor, out[-1].seq)
            if len(out) < limit and self.expects_verdicts:
                out += self._take_overdue(limit - len(out), busy)
            return out

    def _take_overdue(self, limit: int, busy: set[int]) -> list[OutboxRow]:
        due = self._verdicts.overdue(busy)[:limit]
        if not due:
            return []
        marks = ",".join("?" * len(due))
        out = []
        for row in self._db.execute(
            f"SELECT {_ROW} FROM {_ROWS} WHERE o.seq IN ({marks}) AND o.state = ? ORDER BY o.seq", (*due, AWAITING)
        ):
            out.append(_row(row, "awaiting_verdict"))
            self._tally.inflight.add(row[0])
            self._tally.resending.add(row[0])
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
        return mode == "require" or (mode == "auto" and self._tally.verdict_seen)

    def ack(self, seqs: list[int]) -> int:
        """Mark the rows the broker acknowledged as awaiting their verdict (delete them with
        `verdicts = "off"`), and those acknowledged before whose write failed; returns how many
        pending rows changed (a hit sent again is not counted twice). The rows leave the in-flight
        set at once and are not handed out again until their verdict is overdue; if the write fails
        (OutboxError), they stay acknowledged and the next `ack`, with new rows or none, writes them."""
        with self._lock:
            self._tally.acked.update(seqs)
            self._tally.inflight.difference_update(seqs)
            if not self._tally.acked:
                return 0
            self._check_writable()
            try:
                done = self._verdicts.write_acked()
            except sqlite3.Error as e:
                self._file.rollback()
                raise self._file.failed(
                    f"cannot mark {len(self._tally.acked)} acknowledged hits (kept, retried)", e
                ) from None
            self._file.wrote(stored_plainly=False)
            return done

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
                outcome, refused = self._verdicts.apply(verdicts)
            except sqlite3.Error as e:
                self._file.rollback()
                raise self._file.failed(f"cannot apply {len(verdicts)} verdicts of the centre (hits kept)", e) from None
            self._file.wrote(stored_plainly=False)
        for hit_id, reason, error in refused:
            log.error(
                "the centre refused hit %s: %s (%s); kept in the outbox with that reason, not sent again "
                "(%d refused hits kept)",
                hit_id,
                reason,
                error,
                self._tally.quarantined,
            )
        return outcome

    def count_ignored(self, n: int) -> None:
        """Count `n` verdict messages ignored before they reached the outbox (malformed, another
        unit's, or no room to queue them)."""
        if n <= 0:
            return
        with self._lock:
            self._check_writable()
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._file.bump({"verdicts_ignored": n})
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                self._file.rollback()
                raise self._file.failed(f"cannot count {n} ignored verdict messages", e) from None

    def expire(self) -> int:
        """With `verdicts = "auto"` and no verdict ever received, delete the hits that awaited one for
        `verdict_timeout_s` (counted `unconfirmed`: the broker's PUBACK was all they got, as before
        verdicts) and warn once; returns how many went. Nothing expires once verdicts are expected."""
        if self.config.verdicts != "auto" or self._tally.verdict_seen:
            return 0
        with self._lock:
            due = self._verdicts.overdue(self._tally.busy())
            if not due:
                return 0
            self._check_writable()
            try:
                gone = self._verdicts.delete_unconfirmed(due)
            except sqlite3.Error as e:
                self._file.rollback()
                raise self._file.failed(f"cannot delete {len(due)} hits that got no verdict", e) from None
            self._file.wrote(stored_plainly=False)
        self._verdicts.warn_unconfirmed()
        return gone

    def release(self, seqs: list[int]) -> None:
        """Return in-flight rows to the queue so `take` hands them out again, oldest first."""
        with self._lock:
            tally = self._tally
            seqs = [s for s in seqs if s in tally.inflight]
            if seqs:
                tally.inflight.difference_update(seqs)
                tally.resending.difference_update(seqs)
                now = time.monotonic()
                for seq in seqs:
                    if seq in tally.awaiting:
                        tally.awaiting[seq] = (now, tally.awaiting[seq][1])  # still overdue
                self._cursor = min(self._cursor, min(seqs) - 1)

    # --- figures ------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Every hit held: pending, awaiting a verdict and quarantined."""
        return self._tally.rows

    @property
    def unsent(self) -> int:
        """Hits the broker has not acknowledged yet."""
        return self._tally.unsent

    @property
    def awaiting(self) -> int:
        """Hits the broker acknowledged that wait for the centre's verdict."""
        return len(self._tally.awaiting)

    @property
    def quarantined(self) -> int:
        """Hits the centre refused, kept with their reason."""
        return self._tally.quarantined

    @property
    def pending_bytes(self) -> int:
        """Bytes of hit data held (records and crops), what `max_bytes` bounds."""
        return self._tally.size

    @property
    def inflight(self) -> int:
        """Rows handed out by `take` and not yet acknowledged."""
        return len(self._tally.inflight)

    @property
    def refusal(self) -> str | None:
        """While refused hits are kept: how many, and the latest one's reason, for the unit's warnings."""
        if not self._tally.quarantined:
            return None
        return (
            f"the centre refused {self._tally.quarantined} hits (latest: {self._tally.last_refusal}); they are kept "
            f"in the outbox {self.path} and not sent again: fix the cause (for 'unsigned': set [mqtt] signing_key "
            "to the key make-credentials made for this unit)"
        )

    def counters(self) -> dict[str, int]:
        """Totals since the outbox file was created: accepted, sent, each kind of drop, and the verdicts."""
        with self._lock:
            self._check_open()
            return self._file.counters()

    def stats(self) -> dict[str, int]:
        """As the heartbeat reports them: `pending`, hits not yet answered by the centre (unsent or
        awaiting a verdict; refused ones are `quarantined_kept`), `pending_bytes`, all stored hit data
        (what `max_bytes` bounds), and the counters."""
        out = {
            "pending": self._tally.rows - self._tally.quarantined,
            "pending_bytes": self._tally.size,
            "max_bytes": self.config.max_bytes,
            "awaiting_verdict": self.awaiting,
            "quarantined_kept": self._tally.quarantined,
        }
        out.update(self.counters())
        return out

    def rows(self) -> list[OutboxRow]:
        """Every row in order, with its state (for inspection and tests; the publisher uses `take`)."""
        with self._lock:
            self._check_open()
            return [
                _row(row[:8], STATE_NAMES.get(row[8], str(row[8])), row[9], row[10])
                for row in self._db.execute(f"SELECT {_ROW}, o.state, o.reason, o.error FROM {_ROWS} ORDER BY o.seq")
            ]

    def close(self) -> None:
        """Close the file and release its lock; unsent hits stay in it for the next start."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._file.close()


def _row(row: tuple, state: str, reason: str | None = None, error: str | None = None) -> OutboxRow:
    """An OutboxRow of the `_ROW` columns."""
    seq, hit_id, queued_at, record, crop, crop_dropped, context, context_dropped = row
    return OutboxRow(
        seq,
        hit_id,
        queued_at,
        bytes(record),
        bytes(crop) if crop else None,
        crop_dropped,
        state,
        reason,
        error,
        bytes(context) if context else None,
        context_dropped,
    )
