"""The operators' receiver: take hits, status and heartbeats of many units from the broker into a HitStore.

Hits come through an MQTT 5 shared subscription (``$share/<group>/checkpoint/v1/+/+/hits``), so
several receivers split the load; status and heartbeat through plain subscriptions, so every
receiver knows every unit. Each message is acknowledged to the broker only after it is committed
to the store (manual PUBACK): a receiver that dies mid-way gets the message again, and the store
drops the duplicate by hit id. A message that breaks the protocol is kept in `rejects`, acknowledged,
and logged, never retried forever nor lost.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from central.store import HitStore
from wire import records, topics
from wire.errors import ProtocolError
from wire.mqtt import MqttConnection, MqttLink
from wire.topics import TopicLevel

log = logging.getLogger(__name__)


class ReceiverConfig(MqttConnection):
    """How the receiver reaches the broker and which subscriptions it makes."""

    client_id: str = Field(
        default_factory=lambda: f"checkpoint-receiver-{socket.gethostname()}",
        description="stable and different for each receiver (the broker keeps its session by this id)",
    )
    group: TopicLevel = Field(default="checkpoint-receivers", description="shared-subscription group that splits hits")
    shared: bool = Field(default=True, description="use $share/<group>/... (MQTT 5); off: receive every hit")
    receive_maximum: int = Field(default=100, ge=1, le=65535, description="hits the broker may send unacknowledged")
    batch_max: int = Field(default=200, ge=1, le=10000, description="messages committed to the store at once")
    retention_days: float = Field(default=90.0, gt=0, description="hits older than this are purged from the store")

    def subscriptions(self) -> list[str]:
        hits = f"{topics.TOPIC_ROOT}/+/+/hits"
        if self.shared and self.protocol == "5":
            hits = f"$share/{self.group}/{hits}"
        return [hits, f"{topics.TOPIC_ROOT}/+/+/status", f"{topics.TOPIC_ROOT}/+/+/heartbeat"]


@dataclass(frozen=True)
class _Incoming:
    topic: str
    payload: bytes
    mid: int
    qos: int
    retain: bool
    received_at: float


class Receiver:
    """Subscribes, stores, acknowledges. `on_hit(row)` is called once per new hit (not for
    duplicates), `on_unit(site, unit_id, state)` when a unit's status changes."""

    def __init__(
        self,
        config: ReceiverConfig,
        store: HitStore | Path | str,
        *,
        on_hit: Callable[[dict[str, Any]], None] | None = None,
        on_unit: Callable[[str, str, str], None] | None = None,
    ) -> None:
        self.config = config
        self.store = store if isinstance(store, HitStore) else HitStore(store)
        self._owns_store = not isinstance(store, HitStore)
        self._on_hit = on_hit
        self._on_unit = on_unit
        self._queue: queue.Queue[_Incoming] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_purge = 0.0
        self.subscribed = threading.Event()
        self.counts = {"received": 0, "new": 0, "duplicates": 0, "rejected": 0, "status": 0, "heartbeats": 0}
        self.link = MqttLink(
            config,
            config.client_id,
            name=f"receiver {config.client_id}",
            manual_ack=True,
            receive_maximum=config.receive_maximum,
            on_connected=self._on_connected,
            on_message=self._on_message,
            on_subscribe=self._on_subscribe,
        )

    @property
    def state(self) -> str:
        return self.link.state

    @property
    def last_error(self) -> str | None:
        return self.link.last_error

    def start(self) -> None:
        """Connect (retrying in the background) and start storing."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="receiver-store", daemon=True)
        self._thread.start()
        self.link.start()

    def close(self, timeout: float = 5.0) -> None:
        """Disconnect, store what already arrived, and close the store if this receiver opened it."""
        self.link.stop()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._owns_store:
            self.store.close()

    def stats(self) -> dict[str, Any]:
        return {**self.counts, **self.link.figures()}

    # --- network thread -----------------------------------------------------------------------

    def _on_connected(self, session_present: bool, _props: Any) -> None:
        # Subscribing again on a resumed session is harmless, and needed: Mosquitto 2.0 does not
        # restore shared subscriptions from its persistence file.
        self.subscribed.clear()
        self.link.client.subscribe([(t, 1) for t in self.config.subscriptions()])

    def _on_subscribe(self, reasons: list[Any]) -> None:
        topics = self.config.subscriptions()
        refused = [f"{t}: {rc}" for t, rc in zip(topics, reasons) if getattr(rc, "is_failure", False)]
        if refused:
            self.link.note_error(
                f"the broker refused subscriptions ({'; '.join(refused)}): check the broker's ACL for this user"
            )
            return
        log.info("receiver %s: subscribed to %s", self.config.client_id, ", ".join(topics))
        self.subscribed.set()

    def _on_message(self, msg: Any) -> None:
        self._queue.put(_Incoming(msg.topic, bytes(msg.payload), msg.mid, msg.qos, bool(msg.retain), time.time()))

    # --- store thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=0.5)
            except queue.Empty:
                if self._stop.is_set():
                    return
                self._maybe_purge()
                continue
            batch = [first]
            while len(batch) < self.config.batch_max:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            while True:
                try:
                    self._handle(batch)
                    break
                except Exception as e:  # noqa: BLE001 - retry rather than drop an unacknowledged batch
                    self.link.note_error(f"cannot write to the hit store {self.store.location}: {e}")
                    if self._stop.wait(1.0):
                        return
            self._maybe_purge()

    def _maybe_purge(self) -> None:
        now = time.monotonic()
        if now < self._next_purge:
            return
        self._next_purge = now + 3600
        n = self.store.purge(self.config.retention_days * 86400)
        if n:
            log.info("receiver: purged %d hits older than %g days", n, self.config.retention_days)

    def _handle(self, batch: list[_Incoming]) -> None:
        hits: list[tuple[dict[str, Any], bytes | None, float]] = []
        changes: list[tuple[str, str, str]] = []
        for m in batch:
            try:
                site, unit_id, kind = topics.parse_topic(m.topic)
                if kind == "hits":
                    fields, crop = records.decode_hit(m.payload)
                    self._check_origin(fields, site, unit_id)
                    hits.append((fields, crop, m.received_at))
                elif kind == "status":
                    body = records.decode_status(m.payload)
                    self._check_origin(body, site, unit_id)
                    at = body["at"] if m.retain else m.received_at
                    if self.store.set_unit_status(site, unit_id, body["state"], body["reason"], at, m.received_at):
                        changes.append((site, unit_id, body["state"]))
                        log.info("unit %s/%s is %s (%s)", site, unit_id, body["state"], body["reason"])
                    self.counts["status"] += 1
                else:
                    body = records.decode_heartbeat(m.payload)
                    self._check_origin(body, site, unit_id)
                    self.store.set_heartbeat(site, unit_id, body, body["at"] if m.retain else m.received_at)
                    self.counts["heartbeats"] += 1
            except ProtocolError as e:
                log.warning("receiver: rejected message on %s: %s (kept in the store's rejects table)", m.topic, e)
                self.store.add_reject(m.topic, m.payload, str(e), m.received_at)
                self.counts["rejected"] += 1
        new = self.store.add_hits(hits) if hits else []
        # Acknowledge only now: everything in the batch is committed.
        for m in batch:
            if m.qos > 0:
                self.link.client.ack(m.mid, m.qos)
        self.counts["received"] += len(hits)
        for change in changes:
            if self._on_unit is not None:
                try:
                    self._on_unit(*change)
                except Exception:  # noqa: BLE001 - a display problem must not stop storing
                    log.exception("receiver: on_unit handler failed for %s/%s", change[0], change[1])
        for (fields, crop, received_at), is_new in zip(hits, new):
            if not is_new:
                self.counts["duplicates"] += 1
                log.debug("receiver: duplicate of hit %s dropped", fields["id"])
                continue
            self.counts["new"] += 1
            if self._on_hit is not None:
                try:
                    self._on_hit(dict(fields, received_at=received_at, has_crop=crop is not None))
                except Exception:  # noqa: BLE001 - a display problem must not stop storing
                    log.exception("receiver: on_hit handler failed for hit %s", fields["id"])

    @staticmethod
    def _check_origin(body: dict[str, Any], site: str, unit_id: str) -> None:
        if body["site"] != site or body["unit_id"] != unit_id:
            raise ProtocolError(
                f"payload says {body['site']}/{body['unit_id']} but came on the topic of {site}/{unit_id}"
            )
