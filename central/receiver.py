"""The operators' receiver: take hits, status and heartbeats of many units from the broker into a HitStore.

Hits come through an MQTT 5 shared subscription (``$share/<group>/checkpoint/v1/+/+/hits``), so
several receivers split the load; status and heartbeat through plain subscriptions, so every
receiver knows every unit. Each message is acknowledged to the broker only after it is committed
to the store (manual PUBACK): a receiver that dies mid-way gets the message again, and the store
drops the duplicate by hit id.

Every message taken ends either stored or quarantined (the store's `rejects` table, with a reason),
and is acknowledged either way (a QoS 0 one may be dropped before it is taken: below); one bad message never holds up the others. A message that breaks the
protocol, or whose signature does not hold (`signature_policy`), is quarantined at once. When a
batch of hits fails to commit, its hits are retried one by one: the one the store refuses is
quarantined with the store's error, the rest are stored. Only when even quarantining fails (the
store is down) is the batch kept unacknowledged and retried.

Input is bounded before it reaches the store. Hits and status come at QoS 1, so the broker sends at
most `receive_maximum` of them unacknowledged (MQTT 5 flow control; Mosquitto's
max_inflight_messages under 3.1.1); they are never dropped here. QoS 0 messages (heartbeats) are
not flow-controlled, so paho's thread admits them only while fewer than `queue_max` messages and
`queue_max_bytes` bytes of them wait; a payload over its kind's decode limit
(`wire.records.MAX_PAYLOAD_BYTES`) and a unit's QoS 0 message sooner than
`heartbeat_min_interval_s` after its last one are dropped too, before they are parsed. Every such
drop is counted by reason and by unit (`stats()`) and logged at WARNING at most once a minute. The
heartbeats of a batch are written in one transaction, only the newest of each unit.

Every hit taken is answered to its unit on ``checkpoint/v1/<site>/<unit>/verdicts`` (the unit of the
topic it came on, never of its payload): 'stored', 'duplicate' or 'refused' with the quarantine's
reason, batched per unit, at QoS 1, once the batch is committed and before the hits are acknowledged
to the broker. A receiver that dies in between gets the hits again and answers 'duplicate'; a
verdict lost otherwise is made up by the unit, which sends a hit again when its verdict is overdue.
The broker must let the receiver's account write there (deploy/mosquitto/acl); a refusal is counted
(`verdicts_refused`) and shown in `last_error`.

The parts, one job each: `central/receiver_config.py` (ReceiverConfig), `central/admission.py` (the
queue between the network and store threads, its bounds and drops), `central/heartbeats.py` (a
batch's heartbeats, the newest of each unit), `central/verdicts.py` (the verdict messages); this
module subscribes, decodes, checks and stores, and acknowledges.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from central.admission import Admission, Incoming
from central.heartbeats import Beat, write_heartbeats
from central.publications import manifest_site, read_manifest
from central.receiver_config import ReceiverConfig
from central.store import HitStore, open_store
from central.verdicts import verdict_messages
from wire import records, signing, topics
from wire.errors import ProtocolError
from wire.mqtt import MqttLink
from wire.records import safe_text
from wire.timezones import is_zone

log = logging.getLogger(__name__)


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


class Receiver:
    """Subscribes, stores, answers each hit's unit with its verdict, acknowledges. `on_hit(row)` is called once per new hit (not for
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
        self.store = store if isinstance(store, HitStore) else open_store(store)
        self._owns_store = not isinstance(store, HitStore)
        self._on_hit = on_hit
        self._on_unit = on_unit
        self.admission = Admission(config)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_purge = 0.0
        self.subscribed = threading.Event()
        self.counts = {
            "received": 0,
            "new": 0,
            "duplicates": 0,
            "rejected": 0,
            "status": 0,
            "heartbeats": 0,
            "heartbeat_writes": 0,
            "verdicts": 0,
            "verdicts_refused": 0,
            "verdicts_unheard": 0,
            "verdicts_unaddressed": 0,
            "canaries": 0,
            "timezones_ignored": 0,
            "contexts_stripped": 0,
        }
        self._zone_warned: set[tuple[str, str]] = set()  # units whose unusable time zone was logged
        # Hits of the batch being handled that were quarantined: (message, reason, error).
        self._refused: list[tuple[Incoming, str, str]] = []
        self.link = MqttLink(
            config,
            config.client_id,
            name=f"receiver {config.client_id}",
            manual_ack=True,
            receive_maximum=config.receive_maximum,
            on_connected=self._on_connected,
            on_message=self.admission.admit,
            on_subscribe=self._on_subscribe,
            on_publish=self._on_publish,
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
        """Store and acknowledge what already arrived, then disconnect, and close the store if this
        receiver opened it. In that order: an acknowledgement sent after the disconnect is lost, and
        the broker would hand the batch to the group again (stored twice as a duplicate, quarantined
        twice)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.link.stop()
        if self._owns_store:
            self.store.close()

    def stats(self) -> dict[str, Any]:
        """Counts of what arrived (`arrived`: QoS 0 and acknowledged messages), was stored,
        quarantined and dropped (by reason and by unit), the queue's depth now and the most it held
        (`queued`, `queued_max`), and the link's figures. `heartbeats` are heartbeat messages
        written, `heartbeat_writes` the transactions they took."""
        return {**self.counts, **self.admission.figures(), **self.link.figures()}

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

    def _on_publish(self, _mid: int, reason: Any) -> None:
        # Verdicts are all this link publishes.
        if getattr(reason, "is_failure", False):
            self.counts["verdicts_refused"] += 1
            self.link.note_error(
                f"the broker refused a verdict message: {reason} (the broker's ACL must let this receiver's "
                "account write checkpoint/v1/+/+/verdicts: see deploy/mosquitto/acl); units keep their hits "
                "and send them again"
            )
        elif getattr(reason, "value", 0) == 0x10:
            # A unit older than verdicts subscribes to none: nobody to tell, nothing lost.
            self.counts["verdicts_unheard"] += 1

    # --- store thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            batch = self.admission.batch(self.config.batch_max, timeout=0.5)
            if not batch:
                if self._stop.is_set():
                    return
                self._maybe_purge()
                continue
            while True:
                try:
                    self._handle(batch)
                    break
                except Exception as e:  # retry rather than drop an unacknowledged batch
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

    def _handle(self, batch: list[Incoming]) -> None:
        hits: list[tuple[Incoming, tuple[dict[str, Any], bytes | None, float]]] = []
        changes: list[tuple[str, str, str]] = []
        beats: list[Beat] = []
        self._refused = []
        for m in batch:
            try:
                self._take(m, hits, changes, beats)
            except (ProtocolError, Quarantined) as e:
                self._quarantine(m, getattr(e, "reason", "protocol"), str(e))
            except Exception as e:  # a message the checks did not foresee: set aside, not retried
                log.exception("receiver: unexpected error on a message on %s", safe_text(m.topic))
                self._quarantine(m, "error", f"{type(e).__name__}: {e}")
        # Heartbeats before hits: should the store fail after them, the batch is retried with none of
        # its hits stored yet, so each new hit still reaches on_hit (a retry would see a duplicate).
        self._store_heartbeats(beats)
        canaries = self._store_canaries([h for h in hits if h[1][0]["canary"]])
        stored, new = self._store_hits([h for h in hits if not h[1][0]["canary"]])
        # Everything in the batch is committed, as a hit, a canary or a reject: tell the units, then
        # acknowledge (a receiver that dies in between gets the hits again and answers 'duplicate').
        self._send_verdicts(stored + canaries, new + [True] * len(canaries))
        for m in batch:
            if m.qos > 0:
                self.link.client.ack(m.mid, m.qos)
        self.counts["received"] += len(hits)
        for change in changes:
            if self._on_unit is not None:
                try:
                    self._on_unit(*change)
                except Exception:  # a display problem must not stop storing
                    log.exception("receiver: on_unit handler failed for %s/%s", change[0], change[1])
        for (fields, crop, received_at), is_new in zip(stored, new):
            if not is_new:
                self.counts["duplicates"] += 1
                log.debug("receiver: duplicate of hit %s dropped", safe_text(fields["id"]))
                continue
            self.counts["new"] += 1
            if self._on_hit is not None:
                try:
                    row = {k: v for k, v in fields.items() if k != "context_jpeg"}
                    self._on_hit(dict(row, received_at=received_at, has_crop=crop is not None))
                except Exception:  # a display problem must not stop storing
                    log.exception("receiver: on_hit handler failed for hit %s", safe_text(fields["id"]))

    def _send_verdicts(self, stored: list[tuple[dict[str, Any], bytes | None, float]], new: list[bool]) -> None:
        """Publish the batch's verdicts (central/verdicts.py), one message per unit, QoS 1."""
        messages, unaddressed = verdict_messages(stored, new, self._refused)
        self.counts["verdicts_unaddressed"] += unaddressed
        for message in messages:
            self.link.client.publish(message.topic, message.payload, qos=1)
            self.counts["verdicts"] += message.count
        self._refused = []

    def _take(
        self,
        m: Incoming,
        hits: list[tuple[Incoming, tuple[dict[str, Any], bytes | None, float]]],
        changes: list[tuple[str, str, str]],
        beats: list[Beat],
    ) -> None:
        """Decode and check one message; apply a status or an HQ manifest now, or set a hit or
        heartbeat aside for the batch's commit."""
        hq_site = manifest_site(m.topic)
        if hq_site is not None:
            announced = read_manifest(m.topic, m.payload)
            if announced is not None:
                version, published_at = announced
                # A retained manifest replayed on subscribing was published before: HQ's time, if earlier.
                seen = min(published_at or m.received_at, m.received_at) if m.retain else m.received_at
                if self.store.set_publication(hq_site, version, published_at, seen, m.topic):
                    log.info("HQ published watchlist v%d for site %s", version, safe_text(hq_site))
            return
        site, unit_id, kind = topics.parse_topic(m.topic)
        limit = records.MAX_PAYLOAD_BYTES[kind]
        if m.size > limit:
            raise ProtocolError(f"{kind} payload of {m.size} bytes is over the limit of {limit} bytes")
        if kind == "hits":
            fields, crop = records.decode_hit(m.payload)
            self._check_origin(fields, site, unit_id)
            # Verified on the payload as sent, its context frame included, before a too large frame is left out.
            fields["signature"] = self._verify(m.payload, site, unit_id, crop)
            stripped = fields.pop("context_refused", None)
            if stripped is not None:
                self.counts["contexts_stripped"] += 1
                log.warning(
                    "receiver: hit %s of %s/%s: %s",
                    safe_text(fields["id"]),
                    safe_text(site),
                    safe_text(unit_id),
                    stripped,
                )
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
            except Exception as e:  # this message, not the store, may be the problem
                raise Quarantined("store", f"the store refused this status: {e}") from None
            if applied:
                changes.append((site, unit_id, body["state"]))
                log.info("unit %s/%s is %s (%s)", safe_text(site), safe_text(unit_id), body["state"], body["reason"])
            self.counts["status"] += 1
            return
        body = records.decode_heartbeat(m.payload)
        self._check_origin(body, site, unit_id)
        self._check_zone(body, site, unit_id)
        # Ordered by receive time; a retained one replayed on subscribing by its own time if earlier, so
        # a unit that died long ago shows as silent, and one stamped in the future holds back nothing.
        beats.append(Beat(m, site, unit_id, body, min(body["at"], m.received_at) if m.retain else m.received_at))

    def _check_zone(self, body: dict[str, Any], site: str, unit_id: str) -> None:
        """Drop a heartbeat's ``unit.timezone`` that is no IANA zone (wire.timezones), counted as
        `timezones_ignored` and logged once per unit: the heartbeat is kept, the console shows the
        operator's zone for that site instead, and the string is never shown."""
        zone = body["unit"].get("timezone")
        if zone is None or is_zone(zone):
            return
        del body["unit"]["timezone"]
        self.counts["timezones_ignored"] += 1
        if (site, unit_id) not in self._zone_warned and len(self._zone_warned) < 10_000:
            self._zone_warned.add((site, unit_id))
            log.warning(
                "receiver: unit %s/%s states a time zone that is no IANA zone (%s); ignored, its times are "
                "shown in UTC and the operator's zone",
                safe_text(site),
                safe_text(unit_id),
                safe_text(zone, 80),
            )

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
        self, hits: list[tuple[Incoming, tuple[dict[str, Any], bytes | None, float]]]
    ) -> tuple[list[tuple[dict[str, Any], bytes | None, float]], list[bool]]:
        """Commit the hits in one transaction; if that fails, one by one, quarantining each hit the
        store refuses with its error. Returns the hits stored and, for each, whether it was new."""
        if not hits:
            return [], []
        items = [item for _, item in hits]
        try:
            return items, self.store.add_hits(items)
        except Exception as e:  # find the one hit that fails rather than retry all forever
            log.warning("receiver: a batch of %d hits failed to commit (%s); storing them one by one", len(hits), e)
        stored: list[tuple[dict[str, Any], bytes | None, float]] = []
        new: list[bool] = []
        for m, item in hits:
            try:
                new.append(self.store.add_hits([item])[0])
                stored.append(item)
            except Exception as e:  # quarantine it; if the store is down, that raises too
                self._quarantine(m, "store", f"the store refused this hit: {e}")
        return stored, new

    def _store_canaries(
        self, canaries: list[tuple[Incoming, tuple[dict[str, Any], bytes | None, float]]]
    ) -> list[tuple[dict[str, Any], bytes | None, float]]:
        """Record each unit's canary hits (never stored as hits: operators never see the canary) and
        return those recorded. A canary counts only signed by a unit whose key the centre holds: it
        vouches for the unit's credentials too. Others are quarantined, and their unit's canary fails."""
        taken = []
        for m, item in canaries:
            fields = item[0]
            if fields["signature"] != str(signing.Verdict.VALID):
                self._quarantine(
                    m,
                    "canary_unsigned",
                    f"canary hit of {safe_text(fields['site'])}/{safe_text(fields['unit_id'])} with signature "
                    f"{fields['signature']}: a canary counts only signed by a unit whose key the centre holds "
                    "(--unit-keys)",
                )
                continue
            taken.append((m, item))
        if taken:
            try:
                self.store.record_canaries([(f["site"], f["unit_id"], at) for _, (f, _, at) in taken])
            except Exception as e:  # quarantined like a hit the store refuses
                for m, _ in taken:
                    self._quarantine(m, "store", f"the store refused this canary: {e}")
                return []
            self.counts["canaries"] += len(taken)
        return [item for _, item in taken]

    def _store_heartbeats(self, batch: list[Beat]) -> None:
        """Write the batch's heartbeats (central/heartbeats.py), then count those superseded."""
        for b in write_heartbeats(self.store, batch, self.counts, self._quarantine):
            self.admission.drops.add("superseded", f"{b.site}/{b.unit_id}")

    def _quarantine(self, m: Incoming, reason: str, error: str) -> None:
        log.warning(
            "receiver: quarantined message on %s: %s: %s (kept in the store's rejects table)",
            safe_text(m.topic),
            reason,
            safe_text(error, 500),
        )
        self.store.add_reject(m.topic, m.payload, error, m.received_at, reason=reason, payload_bytes=m.size)
        self.counts["rejected"] += 1
        if m.topic.endswith("/hits"):
            self._refused.append((m, reason, error))

    @staticmethod
    def _check_origin(body: dict[str, Any], site: str, unit_id: str) -> None:
        if body["site"] != site or body["unit_id"] != unit_id:
            raise ProtocolError(
                f"payload says {safe_text(body['site'])}/{safe_text(body['unit_id'])} but came on the topic of "
                f"{safe_text(site)}/{safe_text(unit_id)}"
            )
