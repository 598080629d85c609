"""The durable outbox: hits wait here, on disk, until the centre has answered them.

Once `Outbox.put` returns, the hit survives a kill -9 and a power cut. A row is *pending* until the
broker acknowledges it, then *awaiting* the centre's verdict, which deletes it or keeps it as
*quarantined* with the centre's reason. Its parts, one job each:

    config.py     [outbox]: OutboxConfig
    outbox.py     Outbox: put, take, ack, release, verdicts and figures under one lock; OutboxRow
    file.py       the SQLite file: schema (a hit's context frame in a table of its own), rollback
                  journal and its reserve, lock, corrupt files moved aside, a file deleted or
                  replaced while open (OutboxGone), write problems, counters
    room.py       the bounds (max_bytes, the disk) and the order in which rows go when a hit does not fit
    verdicts.py   the verdict wait: PUBACKs, verdicts, resends when overdue, `verdicts = "auto"` expiry
    tally.py      what the outbox holds, counted in memory, and the rows the transport has

    box = Outbox(OutboxConfig(path="/var/lib/checkpoint/outbox.sqlite"))
"""

from edge.outbox.config import MIN_MAX_BYTES, OutboxConfig
from edge.outbox.file import COUNTERS, JOURNAL_RESERVE, STATE_NAMES, OutboxError, OutboxGone
from edge.outbox.outbox import Outbox, OutboxRow
from edge.outbox.verdicts import VerdictOutcome

__all__ = [
    "COUNTERS",
    "JOURNAL_RESERVE",
    "MIN_MAX_BYTES",
    "STATE_NAMES",
    "Outbox",
    "OutboxConfig",
    "OutboxError",
    "OutboxGone",
    "OutboxRow",
    "VerdictOutcome",
]
