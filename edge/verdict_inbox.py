"""The centre's verdicts on a unit's hits, as they come in on ``checkpoint/v1/<site>/<unit>/verdicts``.

paho's network thread only queues a message (`offer`: no parsing, no disk); the reporter's publisher
thread decodes the queue (`take`). Verdicts are checked like anything from outside: only the receiver
account may write that topic (deploy/mosquitto/acl), and a message must decode and name this unit.
Every message left out (another topic, oversized, the queue full, not a verdict, another unit's) is
counted as an ignored verdict in the outbox.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from wire import records
from wire.errors import ProtocolError

log = logging.getLogger(__name__)

# Verdict messages waiting for the publisher thread; more are dropped (counted as ignored) and the
# hits they were about are sent again when overdue. Only the receiver account can write the topic.
MAX_QUEUED_VERDICTS = 256


class VerdictInbox:
    """The verdict messages of unit `unit_id` at `site`, from `offer` (paho's thread) to `take` (the
    publisher thread)."""

    def __init__(self, site: str, unit_id: str, topic: str) -> None:
        self.site = site
        self.unit_id = unit_id
        self.topic = topic
        self._queue: deque[bytes] = deque()
        # Messages dropped in paho's thread (written there only) and how many of those the publisher
        # thread has counted in the outbox (written there only).
        self._dropped = 0
        self._dropped_counted = 0
        self._drop_logged_at = -60.0

    def offer(self, msg: Any) -> bool:
        """Queue a message paho received (paho's thread); False when it was dropped: not this unit's
        verdict topic, over records.MAX_VERDICT_BYTES, or MAX_QUEUED_VERDICTS already waiting."""
        payload = bytes(msg.payload) if len(msg.payload) <= records.MAX_VERDICT_BYTES else b""
        if msg.topic != self.topic or not payload or len(self._queue) >= MAX_QUEUED_VERDICTS:
            self._dropped += 1
            if time.monotonic() - self._drop_logged_at < 60:
                return False  # counted; logged at most once a minute
            self._drop_logged_at = time.monotonic()
            log.warning(
                "mqtt reporter %s: dropped a message on %s (%d bytes): not this unit's verdict topic, over %d "
                "bytes, or %d verdict messages already waiting (counted as ignored verdicts; this warning comes "
                "at most once a minute)",
                self.unit_id,
                records.safe_text(msg.topic),
                len(msg.payload),
                records.MAX_VERDICT_BYTES,
                MAX_QUEUED_VERDICTS,
            )
            return False
        self._queue.append(payload)
        return True

    def take(self, count_ignored: Callable[[int], None]) -> list[records.Verdict]:
        """The verdicts of the messages queued (the publisher thread). Each must decode and name this
        unit; the messages left out since the last call are passed to `count_ignored` first (when it
        raises, the dropped ones are counted at the next call)."""
        dropped = self._dropped
        ignored = dropped - self._dropped_counted
        verdicts: list[records.Verdict] = []
        while self._queue:
            payload = self._queue.popleft()
            try:
                body = records.decode_verdict(payload)
            except ProtocolError as e:
                ignored += 1
                log.warning("mqtt reporter %s: ignored a verdict message that is not one: %s", self.unit_id, e)
                continue
            if (body["site"], body["unit_id"]) != (self.site, self.unit_id):
                ignored += 1
                log.warning(
                    "mqtt reporter %s: ignored a verdict message for %s/%s on this unit's topic",
                    self.unit_id,
                    records.safe_text(body["site"]),
                    records.safe_text(body["unit_id"]),
                )
                continue
            verdicts += body["verdicts"]
        count_ignored(ignored)
        self._dropped_counted = dropped
        return verdicts
