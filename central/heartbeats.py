"""Heartbeats in the receiver's batches: each unit's newest is written, the rest are superseded.

Heartbeats come at QoS 0, as often as every second from each of a thousand units; a batch writes
only the newest of each unit, all in one transaction. `at` orders them: the receive time, or for a
retained one replayed on subscribing the unit's own time if earlier, so a unit that died long ago
shows as silent and one stamped in the future holds back nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from central.admission import Incoming

if TYPE_CHECKING:
    from central.store import HitStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Beat:
    """A decoded heartbeat waiting for its batch's commit; `at` orders it (receive time, or the
    unit's own time for a retained one replayed on subscribing)."""

    message: Incoming
    site: str
    unit_id: str
    body: dict[str, Any]
    at: float


def write_heartbeats(
    store: HitStore,
    batch: list[Beat],
    counts: dict[str, int],
    quarantine: Callable[[Incoming, str, str], None],
) -> list[Beat]:
    """Write the newest heartbeat of each unit in `batch` in one transaction; if that fails, one by
    one, passing each the store refuses to `quarantine` (message, reason, error), which raises when
    the store is down. Counts `heartbeat_writes` (transactions) and `heartbeats` in `counts` as they
    commit. Returns the heartbeats superseded by a newer one of their unit, for the caller to count
    once the whole batch is through (a batch retried while the store is down counts them once)."""
    newest: dict[tuple[str, str], Beat] = {}
    for b in batch:
        kept = newest.get((b.site, b.unit_id))
        if kept is None or kept.at <= b.at:
            newest[(b.site, b.unit_id)] = b
    if not newest:
        return []
    beats = list(newest.values())
    written = {id(b) for b in beats}
    superseded = [b for b in batch if id(b) not in written]
    rows = [(b.site, b.unit_id, b.body, b.at) for b in beats]
    try:
        store.set_heartbeats(rows)
        counts["heartbeat_writes"] += 1
        counts["heartbeats"] += len(beats)
        return superseded
    except Exception as e:  # find the one heartbeat that fails rather than retry all forever
        log.warning("receiver: %d heartbeats failed to commit together (%s); storing them one by one", len(beats), e)
    for b, row in zip(beats, rows):
        try:
            store.set_heartbeats([row])
            counts["heartbeat_writes"] += 1
            counts["heartbeats"] += 1
        except Exception as e:  # quarantine it; if the store is down, that raises too
            quarantine(b.message, "store", f"the store refused this heartbeat: {e}")
    return superseded
