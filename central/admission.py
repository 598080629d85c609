"""What the receiver lets in: the queue between the network thread and the store thread.

QoS 1 messages (hits, status) are never dropped here: the broker sends at most `receive_maximum`
of them unacknowledged, and an oversized one is kept as the prefix the rejects table stores, to be
quarantined and acknowledged. QoS 0 messages (heartbeats) are not flow-controlled, so they are
admitted only while fewer than `queue_max` messages and `queue_max_bytes` bytes of them wait; one
over its kind's decode limit, or a unit's sooner than `heartbeat_min_interval_s` after its last, is
dropped before it is parsed. Every drop is counted by reason and by unit (`Drops`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any

from central.receiver_config import ReceiverConfig
from central.store_intake import REJECT_PAYLOAD_BYTES
from wire import records
from wire.records import safe_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Incoming:
    """A message taken from the broker, waiting for the store thread."""

    topic: str
    payload: bytes  # for an oversized message, only the prefix the rejects table keeps
    mid: int
    qos: int
    retain: bool
    received_at: float
    size: int  # the payload's full size


DROP_REASONS = ("oversized", "too_frequent", "queue_full", "superseded")
"""Why the receiver dropped a message without storing it: over its kind's decode limit (QoS 0), a
unit's QoS 0 message sooner than heartbeat_min_interval_s after its last, no room in the QoS 0 queue,
a heartbeat replaced by a newer one of its unit in the same batch."""
OTHER_UNITS = "(other units)"
MAX_UNITS_COUNTED = 1000
"""Units named in the per-unit drop counts; drops of any further unit are counted under OTHER_UNITS
(topics are the sender's choice: the counts must not grow with them)."""
DROP_LOG_INTERVAL_S = 60.0


class Drops:
    """Messages dropped before the store, by reason and by unit, with a WARNING at most once a
    `log_interval_s` saying how many since the last one. Thread-safe."""

    def __init__(self, log_interval_s: float = DROP_LOG_INTERVAL_S) -> None:
        self.by_reason: Counter[str] = Counter({r: 0 for r in DROP_REASONS})
        self.by_unit: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._log_interval_s = log_interval_s
        self._logged_at = -log_interval_s
        self._since_log: Counter[tuple[str, str]] = Counter()

    def add(self, reason: str, unit: str, n: int = 1) -> None:
        """Count `n` messages of `unit` ("site/unit") dropped for `reason` (one of DROP_REASONS)."""
        with self._lock:
            self.by_reason[reason] += n
            if unit not in self.by_unit and len(self.by_unit) >= MAX_UNITS_COUNTED:
                unit = OTHER_UNITS
            self.by_unit[unit] += n
            self._since_log[(reason, unit)] += n
            now = time.monotonic()
            if now - self._logged_at < self._log_interval_s:
                return
            self._logged_at = now
            top = self._since_log.most_common(5)
            summary = ", ".join(f"{n} {r} from {safe_text(u, 80)}" for (r, u), n in top)
            rest = sum(self._since_log.values()) - sum(n for _, n in top)
            if rest:
                summary += f" and {rest} more"
            self._since_log.clear()
        log.warning(
            "receiver: dropped messages without storing them: %s (counted in the receiver's stats; "
            "this warning comes at most once every %gs)",
            summary,
            self._log_interval_s,
        )

    def figures(self) -> dict[str, Any]:
        with self._lock:
            return {"dropped": dict(self.by_reason), "dropped_by_unit": dict(self.by_unit)}


class Admission:
    """The queue of messages taken from the broker, with its counts: `arrived` (QoS 0 and acknowledged
    messages), `queued` now and the most it held (`queued_max`), and `drops`. `admit` runs on the
    network thread, `batch` on the store thread."""

    def __init__(self, config: ReceiverConfig) -> None:
        self.config = config
        # Unbounded as a container; what enters is bounded in admit (QoS 0 by queue_max and
        # queue_max_bytes, QoS 1 by the broker's flow control).
        self._queue: queue.Queue[Incoming] = queue.Queue()
        self._lock = threading.Lock()
        self.arrived = {"qos0": 0, "acked": 0}
        self.queued = {"qos0": 0, "qos0_bytes": 0, "acked": 0}
        self.queued_max = dict(self.queued)
        # When each unit's (and topic kind's) last QoS 0 message was admitted, oldest first; only
        # those within heartbeat_min_interval_s are kept.
        self._last_qos0: OrderedDict[str, float] = OrderedDict()
        self.drops = Drops()

    def admit(self, msg: Any) -> None:
        """Queue paho's message `msg`, or drop it (counted) when it is QoS 0 and may not wait."""
        topic, payload, qos, retain = msg.topic, msg.payload, msg.qos, bool(msg.retain)
        parts = topic.split("/")
        unit, kind = ("/".join(parts[2:4]), parts[4]) if len(parts) == 5 else (topic, "")
        limit = records.MAX_PAYLOAD_BYTES.get(kind)
        oversized = limit is not None and len(payload) > limit
        with self._lock:
            self.arrived["acked" if qos > 0 else "qos0"] += 1
            if qos > 0:
                # Never dropped: the broker holds the rest until these are acknowledged. An oversized
                # one is kept as the prefix the rejects table stores, then quarantined and acknowledged.
                self._count_queued("acked", 1)
            else:
                why = self._qos0_refusal(f"{unit}/{kind}", len(payload), oversized, retain)
                if why is not None:
                    self.drops.add(why, unit)
                    return
                self._count_queued("qos0", 1)
                self._count_queued("qos0_bytes", len(payload))
        kept = bytes(payload[:REJECT_PAYLOAD_BYTES]) if oversized else bytes(payload)
        self._queue.put(Incoming(topic, kept, msg.mid, qos, retain, time.time(), len(payload)))

    def batch(self, limit: int, timeout: float) -> list[Incoming]:
        """Up to `limit` messages in arrival order, waiting up to `timeout` seconds for the first
        (none when none came), taken off the queue's counts."""
        try:
            batch = [self._queue.get(timeout=timeout)]
        except queue.Empty:
            return []
        while len(batch) < limit:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        with self._lock:
            for m in batch:
                if m.qos > 0:
                    self.queued["acked"] -= 1
                else:
                    self.queued["qos0"] -= 1
                    self.queued["qos0_bytes"] -= m.size
        return batch

    def figures(self) -> dict[str, Any]:
        """The drops by reason and by unit, what arrived, and the queue's depth now and at most."""
        with self._lock:
            queued = {"arrived": dict(self.arrived), "queued": dict(self.queued), "queued_max": dict(self.queued_max)}
        return {**self.drops.figures(), **queued}

    def _qos0_refusal(self, key: str, size: int, oversized: bool, retain: bool) -> str | None:
        """Why a QoS 0 message is dropped (a DROP_REASONS word), or None to queue it; under _lock."""
        if oversized:
            return "oversized"
        now = time.monotonic()
        window = self.config.heartbeat_min_interval_s
        while self._last_qos0 and now - next(iter(self._last_qos0.values())) >= window:
            self._last_qos0.popitem(last=False)
        # A retained message is one the broker replays on (re)subscribing, never a sender's flood:
        # it neither counts against the unit's interval nor is held to it.
        if not retain and key in self._last_qos0:
            return "too_frequent"
        full = self.queued["qos0"] >= self.config.queue_max
        if full or self.queued["qos0_bytes"] + size > self.config.queue_max_bytes:
            return "queue_full"
        if not retain and window > 0:
            self._last_qos0[key] = now
        return None

    def _count_queued(self, what: str, n: int) -> None:
        self.queued[what] += n
        self.queued_max[what] = max(self.queued_max[what], self.queued[what])
