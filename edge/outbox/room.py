"""Storing a new hit within the outbox's bounds, and what goes when it does not fit.

The outbox is bounded by `max_bytes` of stored hit data (all three states) and by the room on its
disk; when a new hit does not fit in either, rows go in this order: hits awaiting a verdict (the
broker acknowledged them, which was all a unit had before verdicts), quarantined hits, the context
frames of the oldest pending hits, the new hit's own context frame, the crops of the oldest pending
hits, the new hit's own crop, pending hit records last. Context frames go before any crop: a
frame helps the operator, the face is what the decision is taken on. Rows the transport holds
(in flight, or acknowledged and not yet written) are never chosen. Every drop is counted
(persistently, in the same transaction) and logged, so nothing disappears silently.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from edge.outbox.config import OutboxConfig
from edge.outbox.file import AWAITING, PENDING, QUARANTINED, OutboxFile, is_full
from edge.outbox.tally import Tally

log = logging.getLogger(__name__)

# Room asked for beyond a new hit's own bytes when the disk is full: its row may need a new table
# and index page besides the pages of its crop.
_FULL_DISK_SLACK = 4 * 4096


@dataclass(frozen=True)
class NewHit:
    """A hit on its way into the outbox, with the counters its storing bumps."""

    hit_id: str
    queued_at: float
    record: bytes
    crop: bytes | None
    crop_dropped: str | None
    bumps: dict[str, int]
    context: bytes | None = None
    context_dropped: str | None = None


@dataclass
class _Drops:
    """Rows chosen in one transaction to make room: (seq, hit id, bytes freed)."""

    contexts: list[tuple[int, str, int]] = field(default_factory=list)
    crops: list[tuple[int, str, int]] = field(default_factory=list)
    records: list[tuple[int, str, int]] = field(default_factory=list)
    awaiting: list[tuple[int, str, int]] = field(default_factory=list)
    quarantined: list[tuple[int, str, int]] = field(default_factory=list)

    def any(self) -> bool:
        """Whether anything was chosen."""
        return bool(self.contexts or self.crops or self.records or self.awaiting or self.quarantined)

    def counts(self, bumps: dict[str, int]) -> dict[str, int]:
        """`bumps` with these drops added to their counters."""
        out = dict(bumps)
        out["contexts_dropped_full"] = out.get("contexts_dropped_full", 0) + len(self.contexts)
        out["crops_dropped_full"] = out.get("crops_dropped_full", 0) + len(self.crops)
        out["hits_dropped_full"] = out.get("hits_dropped_full", 0) + len(self.records)
        out["awaiting_dropped"] = out.get("awaiting_dropped", 0) + len(self.awaiting)
        out["quarantined_dropped"] = out.get("quarantined_dropped", 0) + len(self.quarantined)
        return out


class Room:
    """Inserts new hits into the outbox file, making room by the order above. `write_acked` writes
    the acknowledged rows (on a full disk, their deletes may free room); the caller holds the
    outbox's lock."""

    def __init__(self, file: OutboxFile, tally: Tally, config: OutboxConfig, write_acked: Callable[[], int]) -> None:
        self._file = file
        self._db = file.db
        self._tally = tally
        self._config = config
        self._write_acked = write_acked

    def insert(self, hit: NewHit) -> int | None:
        """One transaction: make room within max_bytes (hits awaiting a verdict, quarantined hits,
        oldest context frames, the hit's own frame, oldest crops, the hit's own crop, oldest records),
        insert the hit, count; returns its
        sequence number (the existing one if the hit is already held), None when it was dropped.
        Accounts and logs only once it committed."""
        crop, crop_dropped, bumps = hit.crop, hit.crop_dropped, dict(hit.bumps)
        context, context_dropped = hit.context, hit.context_dropped
        size = len(hit.record) + (len(crop) if crop else 0)  # the row's `size`; the frame is beside it
        frame = len(context) if context else 0
        self._db.execute("BEGIN IMMEDIATE")
        already = self._db.execute("SELECT seq FROM outbox WHERE hit_id = ?", (hit.hit_id,)).fetchone()
        if already:
            self._db.execute("ROLLBACK")
            log.debug("hit %s is already in the outbox; not stored twice", hit.hit_id)
            return int(already[0])
        drops = _Drops()
        own_crop = own_context = 0
        excess = self._tally.size + size + frame - self._config.max_bytes
        for state in (AWAITING, QUARANTINED):
            if excess > 0:
                excess = self._drop_rows(excess, drops, state)
        if excess > 0:
            excess = self._drop_contexts(excess, drops)
            if excess > 0 and context:
                own_context = frame
                excess -= own_context
                frame = 0
                context, context_dropped = None, "outbox_full"
                bumps["contexts_dropped_full"] = bumps.get("contexts_dropped_full", 0) + 1
        if excess > 0:
            excess = self._drop_crops(excess, drops)
            if excess > 0 and crop:
                own_crop = len(crop)
                excess -= own_crop
                size -= own_crop
                crop, crop_dropped = None, "outbox_full"
                bumps["crops_dropped_full"] = bumps.get("crops_dropped_full", 0) + 1
            if excess > 0:
                excess = self._drop_rows(excess, drops, PENDING)
        seq = None
        if excess > 0:
            bumps["hits_dropped_full"] = bumps.get("hits_dropped_full", 0) + 1
            del bumps["accepted"]
            size = frame = 0
        else:
            seq = self._db.execute(
                "INSERT INTO outbox(hit_id, queued_at, record, crop, crop_dropped, size) VALUES (?,?,?,?,?,?)",
                (hit.hit_id, hit.queued_at, hit.record, crop, crop_dropped, size),
            ).lastrowid
            if context is not None or context_dropped is not None:
                self._db.execute(
                    "INSERT INTO contexts(seq, frame, dropped) VALUES (?,?,?)", (seq, context, context_dropped)
                )
        self._file.bump(drops.counts(bumps))
        self._db.execute("COMMIT")
        self._dropped(drops, "outbox full (outbox.max_bytes)")
        if own_context:
            log.warning("outbox full: dropped the context frame of new hit %s (%d bytes)", hit.hit_id, own_context)
        if own_crop:
            log.warning("outbox full: dropped the face crop of new hit %s (%d bytes)", hit.hit_id, own_crop)
        if seq is None:
            log.error(
                "outbox full and every pending hit is in flight: dropped new hit %s (raise outbox.max_bytes)",
                hit.hit_id,
            )
            return None
        self._tally.rows += 1
        self._tally.size += size + frame
        return int(seq)

    def insert_on_full_disk(self, hit: NewHit, error: sqlite3.Error) -> int | None:
        """The disk has no room for the hit: free pages inside the file, by the same policy as for
        max_bytes (hits already acknowledged and awaiting a verdict first, then quarantined hits, the
        oldest context frames, the hit's own frame, the oldest crops, the hit's own crop, the oldest
        records), each step committed on its own, until the insert fits."""
        self._file.set_problem(
            "full",
            f"outbox {self._file.path}: its disk is full ({error}); a new hit that does not fit makes room by "
            "dropping the oldest face crops, then the oldest hits: free space on that disk or give outbox.path a "
            "larger one",
        )
        try:
            # Only a delete frees room; marking hits as awaiting their verdict frees none.
            retry = self._write_acked() > 0 and self._config.verdicts == "off"
        except sqlite3.Error:
            self._file.rollback()  # the drops below may still fit in the journal's room
            retry = False
        need = len(hit.record) + len(hit.crop or b"") + len(hit.context or b"") + _FULL_DISK_SLACK
        while True:
            if retry:
                try:
                    return self.insert(hit)
                except sqlite3.Error as e:
                    self._file.rollback()
                    if not is_full(e):
                        raise
            retry = True
            if (
                self._free_room(need, "awaiting")
                or self._free_room(need, "quarantined")
                or self._free_room(need, "contexts")
                or (hit.context is None and self._free_room(need, "crops"))
                or (hit.context is None and hit.crop is None and self._free_room(need, "records"))
            ):
                need *= 2
            elif hit.context is not None:
                log.warning(
                    "disk full: dropping the context frame of new hit %s (%d bytes)", hit.hit_id, len(hit.context)
                )
                bumps = dict(hit.bumps, contexts_dropped_full=hit.bumps.get("contexts_dropped_full", 0) + 1)
                hit = replace(hit, context=None, context_dropped="outbox_full", bumps=bumps)
            elif hit.crop is not None:
                log.warning("disk full: dropping the face crop of new hit %s (%d bytes)", hit.hit_id, len(hit.crop))
                bumps = dict(hit.bumps, crops_dropped_full=hit.bumps.get("crops_dropped_full", 0) + 1)
                hit = replace(hit, crop=None, crop_dropped="outbox_full", bumps=bumps)
            else:
                break
        # Nothing left to drop: every other pending hit is in flight.
        self._db.execute("BEGIN IMMEDIATE")
        self._file.bump({"hits_dropped_full": 1, **{k: n for k, n in hit.bumps.items() if k != "accepted"}})
        self._db.execute("COMMIT")
        log.error("disk full and every pending hit is in flight: dropped new hit %s", hit.hit_id)
        return None

    def _free_room(self, need: int, what: str) -> bool:
        """Drop the oldest hits awaiting a verdict, quarantined hits, context frames, crops or pending
        records (`what`) worth `need` bytes in a transaction of their own; False if there was nothing to drop."""
        drops = _Drops()
        self._db.execute("BEGIN IMMEDIATE")
        if what == "contexts":
            self._drop_contexts(need, drops)
        elif what == "crops":
            self._drop_crops(need, drops)
        elif what == "records":
            self._drop_rows(need, drops, PENDING)
        else:
            self._drop_rows(need, drops, AWAITING if what == "awaiting" else QUARANTINED)
        if not drops.any():
            self._db.execute("ROLLBACK")
            return False
        self._file.bump(drops.counts({}))
        self._db.execute("COMMIT")
        self._dropped(drops, "disk full")
        return True

    def _drop_contexts(self, excess: int, drops: _Drops) -> int:
        """The context frames of the oldest pending hits, worth `excess` bytes (their own rows: the
        hits' rows, crops and all, stay as they are)."""
        rows = self._db.execute(
            "SELECT c.seq, o.hit_id, length(c.frame) FROM contexts c JOIN outbox o ON o.seq = c.seq "
            "WHERE c.frame IS NOT NULL AND o.state = ? ORDER BY c.seq",
            (PENDING,),
        )
        excess = self._choose(rows, excess, drops.contexts)
        for seq, _, _ in drops.contexts:
            self._db.execute("UPDATE contexts SET frame = NULL, dropped = 'outbox_full' WHERE seq = ?", (seq,))
        return excess

    def _drop_crops(self, excess: int, drops: _Drops) -> int:
        rows = self._db.execute(
            "SELECT seq, hit_id, length(crop) FROM outbox WHERE crop IS NOT NULL AND state = ? ORDER BY seq", (PENDING,)
        )
        excess = self._choose(rows, excess, drops.crops)
        for seq, _, n in drops.crops:
            self._db.execute(
                "UPDATE outbox SET crop = NULL, crop_dropped = 'outbox_full', size = size - ? WHERE seq = ?", (n, seq)
            )
        return excess

    def _choose(self, rows: Iterable[tuple[int, str, int]], excess: int, chosen: list[tuple[int, str, int]]) -> int:
        """Add to `chosen` the first `rows` (seq, hit id, bytes) the transport does not hold, worth
        `excess` bytes; returns what is still to free."""
        busy = self._tally.busy()
        for seq, hit_id, n in rows:
            if excess <= 0:
                break
            if seq in busy:
                continue
            chosen.append((seq, hit_id, n))
            excess -= n
        return excess

    def _drop_rows(self, excess: int, drops: _Drops, state: int) -> int:
        """Whole rows of `state` (PENDING, AWAITING or QUARANTINED), oldest first, worth `excess` bytes."""
        chosen = {PENDING: drops.records, AWAITING: drops.awaiting, QUARANTINED: drops.quarantined}[state]
        rows = self._db.execute("SELECT seq, hit_id, size FROM held WHERE state = ? ORDER BY seq", (state,))
        excess = self._choose(rows, excess, chosen)
        for seq, _, _ in chosen:
            self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
        return excess

    def _dropped(self, drops: _Drops, why: str) -> None:
        """Account for and log drops that committed."""
        tally = self._tally
        for _, hit_id, n in drops.contexts:
            log.warning("%s: dropped the context frame of pending hit %s (%d bytes)", why, hit_id, n)
            tally.size -= n
        for _, hit_id, n in drops.crops:
            log.warning("%s: dropped the face crop of pending hit %s (%d bytes)", why, hit_id, n)
            tally.size -= n
        for _, hit_id, n in drops.records:
            log.error("%s: dropped pending hit %s entirely", why, hit_id)
            tally.size -= n
        for seq, hit_id, n in drops.awaiting:
            log.warning(
                "%s: dropped hit %s awaiting the centre's verdict (the broker had acknowledged it)", why, hit_id
            )
            tally.size -= n
            tally.awaiting.pop(seq, None)
        for _, hit_id, n in drops.quarantined:
            log.warning("%s: dropped hit %s that the centre had refused (kept for inspection until now)", why, hit_id)
            tally.size -= n
        tally.quarantined -= len(drops.quarantined)
        tally.rows -= len(drops.records) + len(drops.awaiting) + len(drops.quarantined)
        if drops.quarantined:
            tally.last_refusal = self._file.latest_refusal()
