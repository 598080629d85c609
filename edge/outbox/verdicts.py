"""The wait for the centre's verdict: what the broker's PUBACK and the verdicts do to the rows.

A row is *pending* until the broker acknowledges it (its PUBACK), then *awaiting* the verdict of the
centre's receiver: 'stored' or 'duplicate' deletes it, 'refused' keeps it as *quarantined* with the
centre's reason (at most `quarantine_max` of them). A PUBACK only says the broker holds the hit; a
receiver can still refuse it (an unsigned hit from a unit with a registered key), and before
verdicts such a hit was deleted and seen nowhere.

An awaiting row is sent again when no verdict came within `verdict_timeout_s` (doubling with each
resend, up to `_RESEND_BACKOFF_MAX` times that): a verdict can be lost (a receiver killed between its
commit and its verdict), and the receiver answers a hit it holds 'duplicate'. With `verdicts = "auto"`
(the default) and no verdict ever received by this outbox, an awaiting row is deleted instead after
`verdict_timeout_s` (counted `unconfirmed`): the receivers are older than verdicts, and the unit
behaves as before them; the first verdict switches the outbox to waiting for verdicts for good.
`verdicts = "off"` deletes on PUBACK, `"require"` always waits.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from edge.outbox.config import OutboxConfig
from edge.outbox.file import AWAITING, PENDING, QUARANTINED, OutboxFile
from edge.outbox.tally import Tally
from wire.records import Verdict

log = logging.getLogger(__name__)

# An awaiting hit is re-sent after verdict_timeout_s, then twice that, ... at most this many times it.
_RESEND_BACKOFF_MAX = 16
# Acknowledged hits written per transaction, so one delete's journal stays inside JOURNAL_RESERVE.
_ACK_CHUNK = 16


@dataclass(frozen=True)
class VerdictOutcome:
    """What `apply_verdicts` did: hits deleted (stored or duplicate), hits kept as quarantined, and
    verdicts ignored (about hits this outbox does not hold, or already refused)."""

    deleted: int = 0
    quarantined: int = 0
    ignored: int = 0


class VerdictBook:
    """Writes the acknowledgements and verdicts into the outbox file and its tally; the caller holds
    the outbox's lock, and rolls back and reports an sqlite3.Error these raise."""

    def __init__(self, file: OutboxFile, tally: Tally, config: OutboxConfig) -> None:
        self._file = file
        self._db = file.db
        self._tally = tally
        self._config = config
        self._unconfirmed_warned = False

    def overdue(self, busy: set[int]) -> list[int]:
        """Awaiting rows whose verdict is overdue and that the transport does not hold, oldest first."""
        now = time.monotonic()
        return sorted(seq for seq, (at, _) in self._tally.awaiting.items() if at <= now and seq not in busy)

    def write_acked(self) -> int:
        """Write the acknowledged rows, a few per transaction (each one's journal fits the reserve):
        pending ones become awaiting (or are deleted, `verdicts = "off"`), awaiting ones sent again get
        a longer wait; returns how many pending rows changed. Rows of a transaction that failed stay
        acknowledged. A row deleted or quarantined by its verdict meanwhile is left alone."""
        tally = self._tally
        changed = 0
        pending = sorted(tally.acked)
        delete = self._config.verdicts == "off"
        timeout = self._config.verdict_timeout_s
        for i in range(0, len(pending), _ACK_CHUNK):
            chunk = pending[i : i + _ACK_CHUNK]
            marks = ",".join("?" * len(chunk))
            self._db.execute("BEGIN IMMEDIATE")
            found = self._db.execute(f"SELECT seq, state, size FROM held WHERE seq IN ({marks})", chunk).fetchall()
            fresh = [(seq, size) for seq, state, size in found if state == PENDING]
            again = [seq for seq, state, _ in found if state == AWAITING]
            fresh_marks = ",".join("?" * len(fresh))
            if fresh and delete:
                self._db.execute(f"DELETE FROM outbox WHERE seq IN ({fresh_marks})", [s for s, _ in fresh])
            elif fresh:
                self._db.execute(
                    f"UPDATE outbox SET state = ? WHERE seq IN ({fresh_marks})", (AWAITING, *[s for s, _ in fresh])
                )
            self._file.bump({"sent": len(fresh), "resent": len(again), "unconfirmed": len(fresh) if delete else 0})
            self._db.execute("COMMIT")
            tally.acked.difference_update(chunk)
            tally.resending.difference_update(chunk)
            now = time.monotonic()
            if delete:
                tally.rows -= len(fresh)
                tally.size -= sum(size for _, size in fresh)
            else:
                for seq, _ in fresh:
                    tally.awaiting[seq] = (now + timeout, 0)
            for seq in again:
                tries = tally.awaiting.get(seq, (0.0, 0))[1] + 1
                tally.awaiting[seq] = (now + timeout * min(2**tries, _RESEND_BACKOFF_MAX), tries)
            changed += len(fresh)
        return changed

    def apply(self, verdicts: list[Verdict]) -> tuple[VerdictOutcome, list[tuple[str, str, str]]]:
        """Delete or quarantine the rows by the verdicts in one transaction, dropping the oldest
        quarantined rows beyond `quarantine_max`; returns the outcome and the refused hits (hit id,
        reason, the centre's sentence)."""
        tally = self._tally
        by_id: dict[str, Verdict] = {}
        for v in verdicts:
            by_id[v.hit_id] = v  # the last word on a hit counts, as the receiver said it last
        ids = list(by_id)
        rows: list[tuple[int, str, int, int]] = []
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            rows += self._db.execute(
                f"SELECT seq, hit_id, state, size FROM held WHERE hit_id IN ({','.join('?' * len(part))})", part
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
            seqs = [seq for seq, _, _ in deleted[i : i + 500]]
            self._db.execute(f"DELETE FROM outbox WHERE seq IN ({','.join('?' * len(seqs))})", seqs)
        for seq, _, v in refused:
            self._db.execute(
                "UPDATE outbox SET state = ?, reason = ?, error = ? WHERE seq = ?",
                (QUARANTINED, v.reason, v.error, seq),
            )
        over = tally.quarantined + len(refused) - self._config.quarantine_max
        dropped: list[tuple[int, str, int]] = []
        if over > 0:
            dropped = [
                (int(seq), hit_id, int(size))
                for seq, hit_id, size in self._db.execute(
                    "SELECT seq, hit_id, size FROM held WHERE state = ? ORDER BY seq LIMIT ?", (QUARANTINED, over)
                )
            ]
            self._db.executemany("DELETE FROM outbox WHERE seq = ?", [(seq,) for seq, _, _ in dropped])
            bumps["quarantined_dropped"] = len(dropped)
        self._file.bump(bumps)
        self._db.execute("COMMIT")
        # Accounted only once it committed.
        tally.verdict_seen = tally.verdict_seen or len(by_id) > ignored or bool(refused)
        for seq, _, size in deleted:
            tally.forget(seq)
            tally.rows -= 1
            tally.size -= size
        for seq, _, _ in refused:
            tally.forget(seq)
        tally.quarantined += len(refused)
        for _, hit_id, size in dropped:
            log.warning(
                "outbox %s: dropped hit %s that the centre had refused, to keep at most %d (outbox.quarantine_max)",
                self._file.path,
                hit_id,
                self._config.quarantine_max,
            )
            tally.rows -= 1
            tally.size -= size
        tally.quarantined -= len(dropped)
        if refused or dropped:
            tally.last_refusal = self._file.latest_refusal()
        outcome = VerdictOutcome(deleted=len(deleted), quarantined=len(refused), ignored=ignored)
        return outcome, [(v.hit_id, v.reason or "?", v.error or "") for _, _, v in refused]

    def delete_unconfirmed(self, due: list[int]) -> int:
        """Delete the awaiting rows `due`, a few per transaction, counted `unconfirmed`; returns how
        many went. Rows of the transactions that committed stay gone when a later one fails."""
        tally = self._tally
        gone = 0
        for i in range(0, len(due), _ACK_CHUNK):
            chunk = due[i : i + _ACK_CHUNK]
            marks = ",".join("?" * len(chunk))
            self._db.execute("BEGIN IMMEDIATE")
            n, size = self._db.execute(
                f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM held WHERE seq IN ({marks}) AND state = ?",
                (*chunk, AWAITING),
            ).fetchone()
            self._db.execute(f"DELETE FROM outbox WHERE seq IN ({marks}) AND state = ?", (*chunk, AWAITING))
            self._file.bump({"unconfirmed": int(n)})
            self._db.execute("COMMIT")
            for seq in chunk:
                tally.awaiting.pop(seq, None)
            tally.rows -= int(n)
            tally.size -= int(size)
            gone += int(n)
        return gone

    def warn_unconfirmed(self) -> None:
        """Say once that hits go on the broker's PUBACK alone, as no verdict ever came."""
        if self._unconfirmed_warned:
            return
        self._unconfirmed_warned = True
        log.warning(
            "outbox %s: no verdict from the centre within %gs of the broker's PUBACK, and none ever: its "
            "receivers may be older than verdicts, so hits are deleted on the broker's PUBACK as before "
            "(counted 'unconfirmed'); the first verdict that comes makes the unit keep every hit until its "
            'verdict (outbox.verdicts = "require" does so from the start)',
            self._file.path,
            self._config.verdict_timeout_s,
        )
