"""The operators' receiver: take hits, status and heartbeats of many units from the broker into a HitStore.

Hits come through an MQTT 5 shared subscription (``$share/<group>/checkpoint/v1/+/+/hits``), so
several receivers split the load; status and heartbeat through plain subscriptions, so every
receiver knows every unit. Each message is acknowledged to the broker only after it is committed
to the store (manual PUBACK): a receiver that dies mid-way gets the message again, and the store
drops the duplicate by hit id.

Every message ends either stored or quarantined (the store's `rejects` table, with a reason), and
is acknowledged either way; one bad message never holds up the others. A message that breaks the
protocol, or whose signature does not hold (`signature_policy`), is quarantined at once. When a
batch of hits fails to commit, its hits are retried one by one: the one the store refuses is
quarantined with the store's error, the rest are stored. Only when even quarantining fails (the
store is down) is the batch kept unacknowledged and retried.
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
from typing import Any, Literal

from pydantic import Field, model_validator

from central.store import HitStore
from wire import records, signing, topics
from wire.errors import ProtocolError
from wire.mqtt import MqttConnection, MqttLink
from wire.records import safe_text
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
    unit_keys: Path | None = Field(
        default=None, description="unit public keys (a file of key lines or a folder of *.pub files)"
    )
    unsigned: Literal["accept", "reject"] = Field(
        default="accept",
        description="hits and status not verifiably signed from units with no registered key: accept "
        "(stored with their verdict, while units migrate) or reject (quarantined). Units with a registered "
        "key must always sign validly.",
    )

    @model_validator(mode="after")
    def _reject_needs_keys(self) -> ReceiverConfig:
        if self.unsigned == "reject" and self.unit_keys is None:
            raise ValueError("unsigned = reject quarantines every hit unless unit_keys names the units' public keys")
        return self

    def subscriptions(self) -> list[str]:
        hits = f"{topics.TOPIC_ROOT}/+/+/hits"
        if self.shared and self.protocol == "5":
            hits = f"$share/{self.group}/{hits}"
        return [hits, f"{topics.TOPIC_ROOT}/+/+/status", f"{topics.TOPIC_ROOT}/+/+/heartbeat"]


class Quarantined(Exception):
    """A message the receiver will not store; `reason` is the short word kept in `rejects.reason`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def signature_policy(verdict: signing.Verdict, known_unit: bool, unsigned: str) -> str | None:
    """Why a record with this verdict is quarantined, or None when it may be stored.

    The rule: a unit with a registered key must sign every hit and status with it (anything else --
    unsigned, a bad signature, a key the centre does not hold -- is what a stolen broker account
    without the unit's key looks like). A unit with no registered key is accepted with its verdict
    (`unsigned`/`unknown_unit`, shown to operators) unless `unsigned` is "reject". Registering a
    unit's key is the switch that migrates it."""
    if verdict == signing.Verdict.VALID:
        return None
    if known_unit:
        return str(verdict)
    if verdict in (signing.Verdict.UNSIGNED, signing.Verdict.UNKNOWN_UNIT):
        return str(verdict) if unsigned == "reject" else None
    return str(verdict)


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
        self.known_keys = signing.KnownKeys.load(config.unit_keys) if config.unit_keys else signing.KnownKeys()
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
        hits: list[tuple[_Incoming, tuple[dict[str, Any], bytes | None, float]]] = []
        changes: list[tuple[str, str, str]] = []
        for m in batch:
            try:
                self._take(m, hits, changes)
            except (ProtocolError, Quarantined) as e:
                self._quarantine(m, getattr(e, "reason", "protocol"), str(e))
            except Exception as e:  # noqa: BLE001 - a message the checks did not foresee: set aside, not retried
                log.exception("receiver: unexpected error on a message on %s", safe_text(m.topic))
                self._quarantine(m, "error", f"{type(e).__name__}: {e}")
        stored, new = self._store_hits(hits)
        # Acknowledge only now: everything in the batch is committed, as a hit or as a reject.
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
        for (fields, crop, received_at), is_new in zip(stored, new):
            if not is_new:
                self.counts["duplicates"] += 1
                log.debug("receiver: duplicate of hit %s dropped", safe_text(fields["id"]))
                continue
            self.counts["new"] += 1
            if self._on_hit is not None:
                try:
                    self._on_hit(dict(fields, received_at=received_at, has_crop=crop is not None))
                except Exception:  # noqa: BLE001 - a display problem must not stop storing
                    log.exception("receiver: on_hit handler failed for hit %s", safe_text(fields["id"]))

    def _take(
        self,
        m: _Incoming,
        hits: list[tuple[_Incoming, tuple[dict[str, Any], bytes | None, float]]],
        changes: list[tuple[str, str, str]],
    ) -> None:
        """Decode and check one message; queue a hit, or apply a status or heartbeat now."""
        site, unit_id, kind = topics.parse_topic(m.topic)
        if kind == "hits":
            fields, crop = records.decode_hit(m.payload)
            self._check_origin(fields, site, unit_id)
            fields["signature"] = self._verify(m.payload, site, unit_id, crop)
            hits.append((m, (fields, crop, m.received_at)))
            return
        if kind == "status":
            body = records.decode_status(m.payload)
            self._check_origin(body, site, unit_id)
            self._verify(m.payload, site, unit_id, None)
            try:
                applied = self.store.set_unit_status(
                    site, unit_id, body["state"], body["reason"], body["at"], m.received_at, replay=m.retain
                )
            except Exception as e:  # noqa: BLE001 - this message, not the store, may be the problem
                raise Quarantined("store", f"the store refused this status: {e}") from None
            if applied:
                changes.append((site, unit_id, body["state"]))
                log.info("unit %s/%s is %s (%s)", safe_text(site), safe_text(unit_id), body["state"], body["reason"])
            self.counts["status"] += 1
            return
        body = records.decode_heartbeat(m.payload)
        self._check_origin(body, site, unit_id)
        try:
            self.store.set_heartbeat(site, unit_id, body, body["at"] if m.retain else m.received_at)
        except Exception as e:  # noqa: BLE001 - this message, not the store, may be the problem
            raise Quarantined("store", f"the store refused this heartbeat: {e}") from None
        self.counts["heartbeats"] += 1

    def _verify(self, payload: bytes, site: str, unit_id: str, crop: bytes | None) -> str:
        """The record's signature verdict, or Quarantined when the policy refuses it."""
        verdict = signing.verify_record(payload, self.known_keys, crop=crop)
        known = self.known_keys.knows_unit(site, unit_id)
        refused = signature_policy(verdict, known, self.config.unsigned)
        if refused is not None:
            why = "a unit with a registered key must sign with it" if known else "this receiver runs --unsigned reject"
            raise Quarantined(
                refused, f"signature {verdict} on a record of {safe_text(site)}/{safe_text(unit_id)}: {why}"
            )
        return str(verdict)

    def _store_hits(
        self, hits: list[tuple[_Incoming, tuple[dict[str, Any], bytes | None, float]]]
    ) -> tuple[list[tuple[dict[str, Any], bytes | None, float]], list[bool]]:
        """Commit the hits in one transaction; if that fails, one by one, quarantining each hit the
        store refuses with its error. Returns the hits stored and, for each, whether it was new."""
        if not hits:
            return [], []
        items = [item for _, item in hits]
        try:
            return items, self.store.add_hits(items)
        except Exception as e:  # noqa: BLE001 - find the one hit that fails rather than retry all forever
            log.warning("receiver: a batch of %d hits failed to commit (%s); storing them one by one", len(hits), e)
        stored: list[tuple[dict[str, Any], bytes | None, float]] = []
        new: list[bool] = []
        for m, item in hits:
            try:
                new.append(self.store.add_hits([item])[0])
                stored.append(item)
            except Exception as e:  # noqa: BLE001 - quarantine it; if the store is down, that raises too
                self._quarantine(m, "store", f"the store refused this hit: {e}")
        return stored, new

    def _quarantine(self, m: _Incoming, reason: str, error: str) -> None:
        log.warning(
            "receiver: quarantined message on %s: %s: %s (kept in the store's rejects table)",
            safe_text(m.topic),
            reason,
            safe_text(error, 500),
        )
        self.store.add_reject(m.topic, m.payload, error, m.received_at, reason=reason)
        self.counts["rejected"] += 1

    @staticmethod
    def _check_origin(body: dict[str, Any], site: str, unit_id: str) -> None:
        if body["site"] != site or body["unit_id"] != unit_id:
            raise ProtocolError(
                f"payload says {safe_text(body['site'])}/{safe_text(body['unit_id'])} but came on the topic of "
                f"{safe_text(site)}/{safe_text(unit_id)}"
            )
